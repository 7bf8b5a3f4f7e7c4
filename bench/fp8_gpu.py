"""FP8 weights and FP8 KV against bf16 on one GPU, Llama-3-8B shape (dummy weights), one run.

Engines in turn (bf16; FP8 W8A8 projections; FP8 projections and FP8 KV cache; a `+gemv`
suffix turns EngineConfig.triton_gemv on: single rows through the Triton GEMV, bf16 or FP8; a
`+fusedq` suffix after it, on FP8 weights, EngineConfig.fused_fp8_quant: the activations'
per-token quantization inside the RMSNorm and SiLU-and-mul kernels, e.g. `w8+gemv+fusedq`),
same prompts: decode tokens/s at batch 1 and 64, TTFT of one long prompt, saturation output
tokens/s, and how many long sequences the KV cache holds. Details: docs/benchmarks.md.

    python -m bench.fp8_gpu [--variants bf16,w8,w8+gemv,w8+gemv+fusedq] [--repeats 2]
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
from engine.config import EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig

VARIANTS = {"bf16": (None, "auto"), "w8": ("fp8", "auto"), "w8kv8": ("fp8", "fp8")}


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
    parser.add_argument("--fp8-gemv-tiles", default=None,
                        help="tiles per shape for the FP8 GEMV from bench.kernels_gemv --fp8 "
                        "--sweep (same card)")  # fmt: skip
    parser.add_argument("--out", default="bench/results/fp8_gpu.json")
    return parser.parse_args()


def build(
    args: argparse.Namespace,
    quantization: str | None,
    kv_cache_dtype: str,
    gemv: bool,
    fused_quant: bool = False,
) -> Engine:
    return Engine(
        EngineConfig(
            model=f"dummy:{args.shape}", device="cuda", dtype="bfloat16",
            kv_cache_bytes=int(args.kv_cache_gb * 2**30), max_model_len=args.long_len,
            quantization=quantization, kv_cache_dtype=kv_cache_dtype, triton_gemv=gemv,
            fused_fp8_quant=fused_quant,
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
    result = {
        "decode_b1_tok_s": decode(1),
        "ttft_ms": 1000
        * median_of(args.repeats, lambda rep: tandem_ttft(engine, ttft_prompt))["median"],
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
    results: dict[str, dict[str, Any]] = {}
    for name in args.variants.split(","):
        started = time.perf_counter()
        fused_quant = name.endswith("+fusedq")
        base = name.removesuffix("+fusedq")
        base, gemv = base.removesuffix("+gemv"), base.endswith("+gemv")
        if base not in VARIANTS or (fused_quant and VARIANTS[base][0] != "fp8"):
            raise SystemExit(
                f"unknown variant {name!r}; known: {', '.join(VARIANTS)} (+gemv), "
                "and +fusedq after an FP8-weights one"
            )
        engine = build(args, *VARIANTS[base], gemv, fused_quant)
        load_s = time.perf_counter() - started
        results[name] = {"load_s": load_s, **measure(args, engine)}
        print(name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    keys = [k for k in next(iter(results.values())) if k not in ("load_s", "num_kv_blocks")]
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
