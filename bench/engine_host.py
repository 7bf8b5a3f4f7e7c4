"""The engine's host work per decode step on this CPU, with the model taken out: which of
Engine.step's phases cost what at a given batch, and how much of it stays on the critical path
(between one step's tokens and the next step's launch) with `EngineConfig.overlap_outputs`.

The default model (its tokenizer: detokenization and stop checks are real) with its model
runner replaced by a stub that returns fixed logits at once: each sequence's argmax walks
through the token ids of an English text, so text deltas are real. Greedy, `--batch` requests
of `--prompt-len` tokens, `--new-tokens` each (ignore_eos), all added at once; the prefill
steps are not timed. Each phase is timed around the engine's own calls (the same calls
Engine.step makes, in its order), the median over the timed steps; the stub's time and the
argmax over the vocabulary (the GPU's part: the stub times one alike) are left out.

    python -m bench.engine_host [--variants sync,overlap] [--batch 64] [--new-tokens 96]
    PYTHONPATH=<older checkout>:. python bench/engine_host.py --variants sync   # its engine
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any

import torch

from bench.common import machine_info, markdown_table, write_json
from contracts.sampling_params import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig, SchedulerOutput

TEXT = (
    "The capital of France is Paris. It lies on the Seine, and its museums, bridges and cafes "
    "draw visitors from every part of the world in every season of the year. "
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stop", action="store_true", help="give every request a stop string")
    parser.add_argument(
        "--variants", default="sync,overlap", help="sync (overlap_outputs off), overlap"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one run to OUT.N.prof")
    parser.add_argument("--out", default="bench/results/engine_host.json")
    return parser.parse_args()


class StubRunner:
    """Stands in for ModelRunner.execute: logits [num_sampling_seqs, vocab] whose argmax is the
    next token of `cycle` at the sequence's position (no model, no compute beyond a fill). One
    buffer serves every step, as a decode CUDA graph's output buffer does."""

    def __init__(self, cycle: list[int], vocab: int, max_rows: int) -> None:
        self.cycle = cycle
        self.buffer = torch.zeros(max_rows, vocab)
        self.hot: tuple[torch.Tensor, torch.Tensor] | None = None  # last step's one-hot entries
        self.seconds = 0.0
        self.argmax_seconds = 0.0

    def execute(self, scheduled: SchedulerOutput) -> torch.Tensor:
        started = time.perf_counter()
        rows = [s.seq for s in scheduled.scheduled if s.samples_token]
        if self.hot is not None:
            self.buffer[self.hot] = 0.0
        ids = [self.cycle[seq.num_tokens % len(self.cycle)] for seq in rows]
        self.hot = (torch.arange(len(rows)), torch.tensor(ids, dtype=torch.long))
        self.buffer[self.hot] = 1.0
        logits = self.buffer[: len(rows)]
        argmax_started = time.perf_counter()  # the sampler's device part, timed alike once
        logits.argmax(dim=-1)
        self.argmax_seconds += time.perf_counter() - argmax_started
        self.seconds += time.perf_counter() - started
        return logits


def build(args: argparse.Namespace, overlap: bool) -> tuple[Engine, StubRunner]:
    engine = Engine(
        EngineConfig(
            device="cpu",
            num_kv_blocks=args.batch * (-(-(args.prompt_len + args.new_tokens) // 16) + 1),
            scheduler=SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=8192),
            **({"overlap_outputs": True} if overlap else {}),  # type: ignore[arg-type]
        )
    )
    assert engine.tokenizer is not None
    cycle = engine.tokenizer.encode(TEXT)
    stub = StubRunner(cycle, engine.model_config.vocab_size, args.batch)
    engine.runner.execute = stub.execute  # type: ignore[method-assign]
    engine.timers = PhaseTimers(engine, stub)  # type: ignore[attr-defined]
    return engine, stub


class PhaseTimers:
    """Wraps the engine's step phases (the same objects Engine.step calls) with timers:
    seconds per phase in the current step."""

    PHASES = (
        ("launch", "_launch"),  # schedule + graph inputs + launch (stub model time excluded)
        ("collect", "_collect"),  # sample, scheduler.update, finish decisions, frees
        ("outputs", "_outputs_of"),  # text and RequestOutputs (deferred with overlap)
    )

    def __init__(self, engine: Engine, stub: StubRunner) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.stub = stub
        for name, attr in self.PHASES:
            if hasattr(engine, attr):  # an engine before overlap_outputs has none of them
                setattr(engine, attr, self._timed(name, getattr(engine, attr)))
        scheduler = engine.scheduler
        scheduler.schedule = self._timed("schedule", scheduler.schedule)  # type: ignore[method-assign]
        scheduler.update = self._timed("update", scheduler.update)  # type: ignore[method-assign]
        sampler = engine.sampler
        timed_call = self._timed("sample", sampler.__call__)
        engine.sampler = _TimedSampler(timed_call, sampler, self)  # type: ignore[assignment]

    def _timed(self, name: str, call: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            stub_before = self.stub.seconds
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                spent = time.perf_counter() - started - (self.stub.seconds - stub_before)
                self.seconds[name] += spent

        return timed


class _TimedSampler:
    """The engine's sampler with its calls timed as "sample"."""

    def __init__(self, call: Any, sampler: Any, timers: PhaseTimers) -> None:
        self._call = call
        if hasattr(sampler, "greedy"):
            self.greedy = timers._timed("sample", sampler.greedy)

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)


def run_once(engine: Engine, stub: StubRunner, args: argparse.Namespace, rep: int) -> dict:
    """Per decode step (every request decoding): wall time of Engine.step less the stub's,
    and each phase's time (PhaseTimers)."""
    params = SamplingParams(
        max_tokens=args.new_tokens, ignore_eos=True, stop=("zzzz",) if args.stop else ()
    )
    for i in range(args.batch):
        prompt = [100 + (7 * i + 13 * rep + j) % 4000 for j in range(args.prompt_len)]
        engine.add_request(f"r{rep}-{i}", None, params, prompt_token_ids=prompt)
    timers: PhaseTimers = engine.timers  # type: ignore[attr-defined]
    walls: list[float] = []
    phases: dict[str, list[float]] = collections.defaultdict(list)
    num_steps = 0
    while engine.has_unfinished_requests():
        stub.seconds = stub.argmax_seconds = 0.0
        timers.seconds.clear()
        started = time.perf_counter()
        outputs = engine.step()
        wall = time.perf_counter() - started - stub.seconds - stub.argmax_seconds
        num_steps += 1
        if num_steps <= 3 or len(outputs) != args.batch or outputs[0].finished:
            continue  # prefill steps and the first decode, the last step
        walls.append(wall)
        for name, seconds in timers.seconds.items():
            in_sampler = name in ("sample", "collect")
            phases[name].append(seconds - (stub.argmax_seconds if in_sampler else 0.0))
    engine.check_integrity()
    result = {"step_us": 1e6 * statistics.median(walls), "steps": len(walls)}
    result |= {f"{k}_us": 1e6 * statistics.median(v) for k, v in phases.items()}
    # on a GPU the device waits for: the tokens' collection and the next launch (overlap),
    # or everything (synchronous)
    overlap = getattr(engine, "overlaps_outputs", getattr(engine.config, "overlap_outputs", False))
    critical = result.get("collect_us", 0.0) + result.get("launch_us", 0.0)
    result["critical_us"] = critical if overlap else result["step_us"]
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name in args.variants.split(","):
        overlap = name == "overlap"
        engine, stub = build(args, overlap)
        if args.profile:
            import cProfile

            cProfile.runctx("run_once(engine, stub, args, -2)", globals(), locals(),
                            f"{args.out}.{int(overlap)}.prof")  # fmt: skip
        run_once(engine, stub, args, -1)  # warm-up
        runs = [run_once(engine, stub, args, rep) for rep in range(args.repeats)]
        results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(name, results[name], flush=True)
    keys = sorted({k for r in results.values() for k in r if k.endswith("_us")})
    rows = [[k, *(f"{results[v].get(k, float('nan')):.0f}" for v in results)] for k in keys]
    print(f"\nbatch {args.batch}, host us per decode step (median), stub model")
    print(markdown_table(["phase", *results], rows))
    write_json(args.out, {"args": vars(args), "machine": machine_info(), "results": results})


if __name__ == "__main__":
    main()
