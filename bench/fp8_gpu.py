"""FP8 weights and FP8 KV against bf16 on one GPU, Llama-3-8B shape (dummy weights), one run.

Engines in turn (bf16; FP8 W8A8 projections; FP8 projections and FP8 KV cache; switches
appended as in bench.engine_variants: `+gemv` the Triton GEMV for single rows, bf16 or FP8,
`+fusedq` the FP8 activation quantization inside RMSNorm and SiLU-and-mul, `+pdl` the GEMVs
with programmatic dependent launch, `+dense` fresh prefills through SDPA; e.g.
`w8+gemv+fusedq+pdl`), same prompts: decode tokens/s at batch 1 and 64, TTFT of one long
prompt, saturation output tokens/s, and how many long sequences the KV cache holds. Details:
docs/benchmarks.md.

    python -m bench.fp8_gpu [--variants bf16,w8,w8+gemv,w8+gemv+fusedq+pdl] [--repeats 2]
        [--fp8-gemv-tiles kernels_gemv_fp8.json] [--out $OUT/fp8_gpu.json]
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

from bench.common import machine_info, markdown_table, write_json
from bench.engine_gpu import median_of, random_prompts, tandem_decode, tandem_ttft
from bench.engine_variants import BASES, Variant, apply_switches, parse_variant
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig

VARIANTS = BASES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ttft-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--saturation-requests", type=int, default=128)
    parser.add_argument("--long-len", type=int, default=8192)
    parser.add_argument("--kv-cache-gb", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ttft-repeats", type=int, default=None,
                        help="TTFT measurements after the warm-up (default: --repeats); their "
                        "median, min and max are reported")  # fmt: skip
    parser.add_argument("--fp8-gemv-tiles", default=None,
                        help="tiles per shape for the FP8 GEMV from bench.kernels_gemv --fp8 "
                        "--sweep (same card)")  # fmt: skip
    parser.add_argument("--gc", choices=("on", "freeze", "off"), default="on",
                        help="Python's cyclic garbage collector while measuring: on; every "
                        "object made by then frozen out of it once the engine is built "
                        "(gc.freeze); off (gc.disable)")  # fmt: skip
    parser.add_argument("--out", default="bench/results/fp8_gpu.json")
    return parser.parse_args()


def build(args: argparse.Namespace, variant: Variant) -> Engine:
    apply_switches(variant)
    return Engine(
        EngineConfig(
            model=f"dummy:{args.shape}", device="cuda", dtype="bfloat16",
            kv_cache_bytes=int(args.kv_cache_gb * 2**30), max_model_len=args.long_len,
            **variant.engine_options(),  # type: ignore[arg-type]
            scheduler=SchedulerConfig(
                max_num_seqs=max(args.saturation_requests, args.batch),
                max_num_batched_tokens=max(args.ttft_len, 8192),
            ),
        )
    )  # fmt: skip


def measure(args: argparse.Namespace, engine: Engine) -> dict[str, Any]:
    vocab = engine.model_config.vocab_size

    def decode(batch: int) -> float:
        return median_of(
            args.repeats,
            lambda rep: tandem_decode(
                engine, random_prompts(batch, args.prompt_len, vocab, 100 * batch + rep),
                args.new_tokens,
            )[0],
        )["median"]  # fmt: skip

    saturation = float("nan")
    if args.saturation_requests > 1:
        saturation = median_of(
            args.repeats,
            lambda rep: tandem_decode(
                engine, random_prompts(args.saturation_requests, args.prompt_len, vocab, 7 + rep),
                args.new_tokens,
            )[1],
        )["median"]  # fmt: skip
    ttft_prompt = random_prompts(1, args.ttft_len, vocab, seed=3)[0]
    ttft = median_of(
        args.ttft_repeats or args.repeats, lambda rep: tandem_ttft(engine, ttft_prompt)
    )
    result = {
        "decode_b1_tok_s": decode(1),
        "ttft_ms": 1000 * ttft["median"],
        "ttft_ms_min": 1000 * ttft["min"],
        "ttft_ms_max": 1000 * ttft["max"],
        f"decode_b{args.batch}_tok_s": decode(args.batch),
        "saturation_tok_s": saturation,
        "long_seqs_that_fit": engine.num_kv_blocks * engine.config.block_size // args.long_len,
        "num_kv_blocks": engine.num_kv_blocks,
        "gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    engine.check_integrity()
    return result


def main() -> None:
    args = parse_args()
    if args.fp8_gemv_tiles:
        import json

        from engine.kernels.fp8_gemv import TUNED, Fp8GemvConfig

        with open(args.fp8_gemv_tiles) as f:
            for shape, tiles in json.load(f)["tiles"].items():
                m, n, k = (int(v) for v in shape.split(","))
                TUNED[(m, n, k)] = Fp8GemvConfig(*tiles)
        print("FP8 GEMV tiles:", TUNED, flush=True)
    names = args.variants.split(",")
    if len(set(names)) != len(names):  # results are keyed by name: a repeat would overwrite
        raise SystemExit(f"--variants names a variant twice: {args.variants}")
    try:
        variants = [parse_variant(name) for name in names]
    except ValueError as error:
        raise SystemExit(str(error)) from None
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        name = variant.name
        started = time.perf_counter()
        engine = build(args, variant)
        load_s = time.perf_counter() - started
        if args.gc == "freeze":
            gc.collect()
            gc.freeze()
        elif args.gc == "off":
            gc.disable()
        try:
            results[name] = {"load_s": load_s, **measure(args, engine)}
        finally:
            gc.enable()
            gc.unfreeze()
        results[name]["total_s"] = time.perf_counter() - started
        print(name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    keys = [
        k for k in next(iter(results.values())) if k not in ("load_s", "total_s", "num_kv_blocks")
    ]
    base = results.get("bf16")
    rows = []
    for key in keys:
        cells = [f"{results[n][key]:.1f}" for n in results]
        if base is not None:
            cells += [f"{results[n][key] / base[key]:.2f}x" for n in results if n != "bf16"]
        rows.append((key, *cells))
    headers = ["metric", *results, *(f"{n}/bf16" for n in results if n != "bf16" and base)]
    print(f"{torch.cuda.get_device_name()}, shape {args.shape}")
    print(markdown_table(headers, rows))
    data = {"args": vars(args), "results": results, "machine": machine_info(("torch", "triton"))}
    print(f"wrote {write_json(args.out, data)}")


if __name__ == "__main__":
    main()
