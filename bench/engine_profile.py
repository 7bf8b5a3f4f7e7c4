"""Where an engine step's time goes on one GPU: decode at each `--decode-batches` size
(default 1 and 64), a 2,048-token prefill and steps at saturation (Llama-3-8B shape, dummy bf16
weights): host phases per step and GPU kernel time by family (torch.profiler), for one engine
per `--variants` entry side by side. A variant is `default` (the engine's defaults) or
`default` followed by switches: `+gemv` (the Triton GEMV for one-row projections), `+pdl`,
`+dense`, `+varlen` (dense, one FlashAttention-2 call a step), `-pinned`, `-overlap`
(EngineConfig.overlap_outputs off; on CUDA the default launches each step before the previous
one's outputs are made), or a name of bench.engine_variants (`bf16`, `w8kv8+gemv+fusedq`, ...:
FP8 weights and KV among them); `main` is an older
checkout's engine, run with that checkout first on PYTHONPATH. (`new` and `new-nogemv`, the
names of the first runs, mean `default+gemv` and `default`.) Details: docs/benchmarks.md.

    python -m bench.engine_profile [--variants default,default+gemv] [--decode-batches 1,64]
        [--trace-dir DIR] [--out F]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import random
import statistics
import time
from typing import Any

import torch

from bench.common import machine_info, markdown_table, write_json
from bench.engine_gpu import dummy_engine, random_prompts, tandem_ttft
from bench.engine_variants import BASES, apply_switches, parse_variant
from contracts.sampling_params import SamplingParams
from engine.engine import Engine


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--variants", default="default,default+gemv")
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--ttft-len", type=int, default=2048)
    parser.add_argument("--ttft-repeats", type=int, default=5)
    parser.add_argument("--saturation-requests", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-cache-gb", type=float, default=30.0)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--out", default="bench/results/engine_profile.json")
    return parser.parse_args()


FAMILIES = (
    ("gemv", "gemv"),
    ("attn_decode", "decode_attention"),
    ("attn_decode", "_decode"),
    ("attn_prefill", "prefill"),
    ("attn_prefill", "flash"),
    ("attn_prefill", "fmha"),
    ("attn_prefill", "attention"),
    ("rms_norm", "rms_norm"),
    ("rotary", "rotary"),
    ("kv_write", "kv_write"),
    ("silu_mul", "silu"),
    ("argmax/sample", "argmax"),
    ("gemm", "gemm"),
    ("gemm", "sm90"),
    ("gemm", "cutlass"),
    ("gemm", "nvjet"),
    ("gemm", "cublas"),
    ("copy/index", "copy"),
    ("copy/index", "index"),
    ("copy/index", "Memcpy"),
    ("copy/index", "fill"),
    ("embedding", "embedding"),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, key in FAMILIES:
        if key.lower() in low:
            return fam
    return "other"


class StepTimer:
    """Engine.step with host-phase timers (same calls, same order)."""

    def __init__(self) -> None:
        self.phases: dict[str, list[float]] = collections.defaultdict(list)

    def step(self, engine: Engine) -> list:
        if hasattr(engine, "_collect"):
            return self._phased_step(engine)
        t0 = time.perf_counter()
        scheduled = engine.scheduler.schedule()
        t1 = time.perf_counter()
        if not scheduled.scheduled:
            return []
        logits = engine.runner.execute(scheduled)
        t2 = time.perf_counter()
        samplers = [s.seq for s in scheduled.scheduled if s.samples_token]
        sampled = engine.sampler(logits, [engine._sample_row(seq) for seq in samplers])
        t3 = time.perf_counter()
        engine.scheduler.update(scheduled, sampled.token_ids)
        outputs = []
        for seq, logprobs in zip(samplers, sampled.logprobs, strict=True):
            output = engine.outputs.process_token(seq, logprobs)
            if output.finished:
                engine._release(seq)
            outputs.append(output)
        t4 = time.perf_counter()
        kind = "prefill" if any(s.num_new_tokens > 1 for s in scheduled.scheduled) else "decode"
        for name, value in (("schedule", t1 - t0), ("execute", t2 - t1), ("sample+wait", t3 - t2),
                            ("update+outputs", t4 - t3), ("total", t4 - t0)):  # fmt: skip
            self.phases[f"{kind}/{name}"].append(value)
        return outputs

    def _phased_step(self, engine: Engine) -> list:
        """Engine.step of an engine with overlap_outputs (same calls, same order): launch
        (with overlap, of the next step: before the collection where it follows the one
        collected, FOLLOW_DECODES, else after it), collect+wait (sampler with its wait for
        the GPU, update, finishes), outputs (text)."""
        t0 = time.perf_counter()
        launched, engine._in_flight = engine._in_flight or engine._launch(), None
        if launched is None:
            return []
        engine._in_flight = engine._launch_following(launched)
        t1 = time.perf_counter()
        kind = (
            "prefill"
            if any(s.num_new_tokens > 1 for s in launched.scheduled.scheduled)
            else "decode"
        )
        pending = engine._collect(launched)
        following = engine._in_flight
        if following is not None and all(seq.is_finished for seq in following.samplers):
            engine._collect(following)
            engine._in_flight = following = None
        t2 = time.perf_counter()
        if following is None and engine.overlaps_outputs:  # None if it could preempt
            engine._in_flight = engine._launch(ahead=True)
        t3 = time.perf_counter()
        outputs = engine._outputs_of(pending)
        t4 = time.perf_counter()
        for name, value in (("launch", t1 - t0 + t3 - t2), ("collect+wait", t2 - t1),
                            ("outputs", t4 - t3), ("total", t4 - t0)):  # fmt: skip
            self.phases[f"{kind}/{name}"].append(value)
        return outputs


def kernel_table(prof: Any, steps: int) -> dict[str, float]:
    """GPU microseconds per step by kernel family."""
    per_family: dict[str, float] = collections.defaultdict(float)
    per_kernel: dict[str, float] = collections.defaultdict(float)
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", 0.0)
        if device_us <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        per_family[family(evt.key)] += device_us / steps
        per_kernel[evt.key[:80]] += device_us / steps
    per_family["GPU busy"] = sum(per_family.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    print("  top kernels (us/step):", "; ".join(f"{k} {v:.0f}" for k, v in top), flush=True)
    host = sorted(
        (e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
        key=lambda e: -e.self_cpu_time_total,
    )[:12]
    print("  top host ops (self us/step):",
          "; ".join(f"{e.key[:60]} {e.self_cpu_time_total / steps:.0f}" for e in host),
          flush=True)  # fmt: skip
    return dict(per_family)


def profile_decode(engine: Engine, args: argparse.Namespace, batch: int, trace: str | None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    vocab = engine.model_config.vocab_size
    prompts = random_prompts(batch, args.prompt_len, vocab, seed=3)
    engine.block_manager.reset_prefix_cache()
    params = SamplingParams(max_tokens=args.decode_steps * 3 + 16, ignore_eos=True)
    ids = [f"dec{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, None, params, prompt_token_ids=prompt)
    timer = StepTimer()
    for _ in range(args.decode_steps):  # prefill + warm decode steps
        timer.step(engine)
    torch.cuda.synchronize()
    timer = StepTimer()
    started = time.perf_counter()
    for _ in range(args.decode_steps):
        timer.step(engine)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / args.decode_steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            StepTimer().step(engine)
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    for rid in ids:
        engine.abort_request(rid)
    if any(k.startswith("prefill/") for k in timer.phases):
        raise RuntimeError(f"batch {batch}: a timed step carried prefill (raise --decode-steps)")
    host = {k: 1e6 * statistics.median(v) for k, v in timer.phases.items()}
    return {"batch": batch, "step_us": 1e6 * wall, "tok_s": batch / wall, "host_us": host,
            "gpu_us": kernel_table(prof, 8)}  # fmt: skip


def profile_ttft(engine: Engine, args: argparse.Namespace, trace: str | None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    vocab = engine.model_config.vocab_size
    prompt = random_prompts(1, args.ttft_len, vocab, seed=7)[0]

    def once() -> float:
        return tandem_ttft(engine, prompt)

    once()
    values = [once() for _ in range(args.ttft_repeats)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        once()
    if trace:
        prof.export_chrome_trace(trace)
    return {"ttft_ms": 1000 * statistics.median(values), "values_ms": [1000 * v for v in values],
            "gpu_us": kernel_table(prof, 1)}  # fmt: skip


def profile_saturation(engine: Engine, args: argparse.Namespace) -> dict:
    vocab = engine.model_config.vocab_size
    rng = random.Random(5)
    prompts = [
        [rng.randrange(100, vocab) for _ in range(1024)] for _ in range(args.saturation_requests)
    ]
    params = SamplingParams(max_tokens=128, ignore_eos=True)
    engine.block_manager.reset_prefix_cache()
    timer = StepTimer()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"s{i}", None, params, prompt_token_ids=prompt)
    generated = 0
    while engine.has_unfinished_requests():
        generated += len(timer.step(engine))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    sums = {k: sum(v) for k, v in timer.phases.items()}
    counts = {k.split("/")[0]: len(v) for k, v in timer.phases.items()}
    return {"output_tok_s": generated / seconds, "seconds": seconds, "steps": counts,
            "phase_s": sums}  # fmt: skip


def run_variant(name: str, args: argparse.Namespace) -> dict:
    # "main": code without the switches (run against an older checkout); otherwise the
    # engine's defaults with the variant's switches flipped (see the module docstring).
    extra: dict[str, Any] = {}
    if name.split("+")[0] in BASES:  # a bench.engine_variants name (bf16, w8kv8+gemv, ...)
        variant = parse_variant(name)
        apply_switches(variant)
        extra = variant.engine_options()
    elif name != "main":
        apply_switches(parse_variant("bf16"))  # every module switch back to its default
        import engine.cuda_graph as cuda_graph
        import engine.kernels.gemv as gemv_module
        import engine.triton_attention as triton_attention

        name = {"new": "default+gemv", "new-nogemv": "default"}.get(name, name)
        cuda_graph.PINNED_INPUTS = "-pinned" not in name
        gemv_module.USE_PDL = "+pdl" in name
        dense = "+dense" in name or "+varlen" in name
        triton_attention.DENSE_FRESH_PREFILL = True if dense else None
        triton_attention.DENSE_VARLEN = "+varlen" in name
        extra["triton_gemv"] = "+gemv" in name or "+pdl" in name
    engine = dummy_engine(
        args.shape, args.kv_cache_gb, max_model_len=4096, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, **extra,
    )  # fmt: skip
    if "-overlap" in name:  # read at every step; the default overlaps on CUDA
        engine.config = dataclasses.replace(engine.config, overlap_outputs=False)
    trace = args.trace_dir
    slug = name.replace("+", "_")  # file names the device tool hands back: no "+"
    result: dict[str, Any] = {}
    for batch in (int(b) for b in args.decode_batches.split(",")):
        where = trace and f"{trace}/decode{batch}_{slug}.json.gz"
        result[f"decode{batch}"] = profile_decode(engine, args, batch, where)
    result["ttft"] = profile_ttft(engine, args, trace and f"{trace}/ttft_{slug}.json.gz")
    if args.saturation_requests:
        profile_saturation(engine, args)  # warm-up: compiles every prefill/decode shape
        result["saturation"] = profile_saturation(engine, args)
    engine.check_integrity()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    print(name, json.dumps(result, default=str)[:1500], flush=True)
    return result


def main() -> None:
    args = parse_args()
    variants = args.variants.split(",")
    results = {v: run_variant(v, args) for v in variants}
    device = torch.cuda.get_device_name()

    def row(label: str, part: str, key: str, fmt: str, sub: str | None = None) -> list[str]:
        cells = []
        for v in variants:
            value = results[v][part][sub].get(key) if sub else results[v][part][key]
            cells.append(format(value, fmt) if value is not None else "-")
        return [label, *cells]

    def keys(part: str, sub: str) -> list[str]:
        return sorted({k for v in variants for k in results[v][part][sub]})

    rows: list[list[str]] = []
    for batch in (int(b) for b in args.decode_batches.split(",")):
        part = f"decode{batch}"
        rows.append(row(f"decode b{batch} tok/s", part, "tok_s", ".1f"))
        rows.append(row(f"decode b{batch} step us", part, "step_us", ".0f"))
        rows += [row(f"  host {k} us", part, k, ".0f", "host_us") for k in keys(part, "host_us")]
        rows += [row(f"  gpu {k} us", part, k, ".0f", "gpu_us") for k in keys(part, "gpu_us")]
    rows.append(row("TTFT ms", "ttft", "ttft_ms", ".1f"))
    rows += [row(f"  gpu {k} us", "ttft", k, ".0f", "gpu_us") for k in keys("ttft", "gpu_us")]
    if args.saturation_requests:
        rows.append(row("saturation out tok/s", "saturation", "output_tok_s", ".0f"))
        rows += [
            row(f"  {k} s", "saturation", k, ".2f", "phase_s")
            for k in keys("saturation", "phase_s")
        ]
        rows.append(["  steps"] + [str(results[v]["saturation"]["steps"]) for v in variants])
    table = markdown_table([f"{args.shape}, {device}", *variants], rows)
    print(f"\n{table}")
    write_json(args.out, {"config": vars(args), "machine": machine_info(), "device": device,
                          "results": results, "table": table})  # fmt: skip


if __name__ == "__main__":
    main()
