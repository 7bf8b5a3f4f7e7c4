"""Skinny products (decode projections) on one GPU: cuBLAS `F.linear` against the Triton GEMV
(`engine.kernels.gemv`) with its default tiles, with and without programmatic dependent launch
(PDL), and (`--sweep`) over a grid of tiles, for the Llama-3-8B projections at M = 1, 4, 16.
With `--fp8`: e4m3 weights (per-channel scales) and per-token quantized x, `torch._scaled_mm`
against the FP8 GEMV (`engine.kernels.fp8_gemv`) for the four decoder projections (the LM head
stays bf16), and with `--sweep` the best tiles per shape written to the JSON's "tiles" (what
`bench.fp8_gpu --fp8-gemv-tiles` reads).

Each timing replays a CUDA graph of one product per weight copy, over enough copies (at least
400 MB of weights) that no weight stays in L2, as in a decode step; time per product is the
median of `--repeats` replays over the copies. Bandwidth counts the weight bytes alone.

    python -m bench.kernels_gemv [--rows 1,4,16] [--repeats 20] [--sweep] [--fp8] [--out F]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

import engine.kernels.gemv as gemv_module
from bench.common import machine_info, markdown_table, write_json
from engine.kernels.gemv import GemvConfig, default_config, gemv, gemv_ref

# name: (N, K) of the Llama-3-8B shape's projections
SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tiles")
    parser.add_argument("--fp8", action="store_true", help="FP8 W8A8: _scaled_mm vs fp8_gemv")
    parser.add_argument("--out", default="bench/results/kernels_gemv.json")
    return parser.parse_args()


def sweep(m: int) -> list[GemvConfig]:
    if m == 1:
        grid = itertools.product((4, 8, 16), (512, 1024), (4, 8), (3,))
    else:
        grid = itertools.product((16, 32), (128, 256, 512), (4,), (3,))
    return [GemvConfig(*c) for c in grid]


def time_graph(fn: Callable[[int], torch.Tensor], copies: int, repeats: int) -> float:
    """Median seconds of one call, from graph replays of `copies` calls."""
    for i in range(copies):  # compile and warm up outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / copies)
    return statistics.median(times)


def fp8_sweep(m: int) -> list:
    from engine.kernels.fp8_gemv import Fp8GemvConfig

    if m == 1:
        grid = itertools.product((2, 4, 8, 16), (1024, 2048, 4096), (4, 8), (3,))
    else:
        grid = itertools.product((2, 4, 8), (256, 512, 1024), (4,), (3,))
    return [Fp8GemvConfig(*c) for c in grid]


def main_fp8(args: argparse.Namespace) -> None:
    from engine.kernels.fp8_gemv import default_config as fp8_default
    from engine.kernels.fp8_gemv import fp8_gemv, fp8_gemv_ref
    from engine.kernels.fp8_quant import quantize_per_token_fused
    from engine.quantization import FP8_DTYPE

    torch.manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    results: dict[str, dict] = {}
    tiles: dict[str, list[int]] = {}
    table = []
    for name, (n, k) in SHAPES.items():
        if name == "lm_head":
            continue
        weight_bytes = n * k
        copies = max(2, -(-400_000_000 // weight_bytes))
        weights = [
            (torch.randn(n, k, device="cuda") / 4).to(FP8_DTYPE) for _ in range(copies)
        ]  # fmt: skip
        w_scale = torch.rand(n, device="cuda") / 100 + 1e-3
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_per_token_fused(x)
            ref = fp8_gemv_ref(xq, xs, weights[0], w_scale, torch.float32)
            entry: dict = {"configs": []}
            entry["scaled_mm_s"] = time_graph(
                lambda i, xq=xq, xs=xs, ws=weights, sc=w_scale: torch._scaled_mm(
                    xq, ws[i].t(), scale_a=xs, scale_b=sc.view(1, -1),
                    out_dtype=torch.bfloat16,
                ),
                copies, args.repeats,
            )  # fmt: skip
            out = fp8_gemv(xq, xs, weights[0], w_scale).float()
            entry["error"] = err = ((out - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"{name} M={m}: relative error {err}"
            entry["default_s"] = time_graph(
                lambda i, xq=xq, xs=xs, ws=weights, sc=w_scale: fp8_gemv(xq, xs, ws[i], sc),
                copies, args.repeats,
            )  # fmt: skip
            best = (entry["default_s"], fp8_default(m, n, k))
            for cfg in fp8_sweep(m) if args.sweep else []:
                try:
                    seconds = time_graph(
                        lambda i, cfg=cfg, xq=xq, xs=xs, ws=weights, sc=w_scale: fp8_gemv(
                            xq, xs, ws[i], sc, config=cfg
                        ),
                        copies, args.repeats,
                    )  # fmt: skip
                except Exception as exc:  # a tile that does not compile (registers)
                    print(f"  {cfg}: {type(exc).__name__}", flush=True)
                    continue
                entry["configs"].append({"config": str(cfg), "s": seconds})
                if seconds < best[0]:
                    best = (seconds, cfg)
            c = best[1]
            tiles[f"{m},{n},{k}"] = [c.block_n, c.block_k, c.num_warps, c.num_stages]
            results[f"{name}/M={m}"] = entry
            tbs = weight_bytes / 1e12
            cells = [entry["scaled_mm_s"], entry["default_s"], best[0]]
            row = [name, str(m)] + [f"{1e6 * t:.1f} ({tbs / t:.2f})" for t in cells]
            row.append(f"{c.block_n}/{c.block_k}/{c.num_warps}")
            table.append(row)
            print(row, flush=True)
        weights.clear()
        torch.cuda.empty_cache()
    text = markdown_table(
        ["proj", "M", "_scaled_mm us (TB/s)", "fp8_gemv default", "best", "best BN/BK/warps"],
        table,
    )
    device = torch.cuda.get_device_name()
    print(f"\nLlama-3-8B projections, FP8 e4m3 W8A8, {device}\n{text}")
    write_json(args.out, {"machine": machine_info(), "device": device, "results": results,
                          "table": text, "tiles": tiles})  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.fp8:
        main_fp8(args)
        return
    torch.manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    results: dict[str, dict] = {}
    table = []
    for name, (n, k) in SHAPES.items():
        weight_bytes = n * k * 2
        copies = max(2, -(-400_000_000 // weight_bytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5]
        weights += [torch.randn_like(weights[0]) / k**0.5 for _ in range(copies - 1)]
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = gemv_ref(x, weights[0]).float()
            entry: dict = {"configs": []}
            entry["cublas_s"] = time_graph(
                lambda i, x=x: F.linear(x, weights[i]),  # noqa: B023 (used before the loop ends)
                copies, args.repeats,
            )  # fmt: skip
            for pdl in (False, True):
                gemv_module.USE_PDL = pdl
                out = gemv(x, weights[0]).float()
                entry[f"error_pdl_{pdl}"] = err = ((out - ref).norm() / ref.norm()).item()
                assert err < 1e-2, f"{name} M={m} pdl={pdl}: relative error {err}"
                entry[f"default_pdl_{pdl}_s"] = time_graph(
                    lambda i, x=x: gemv(x, weights[i]),  # noqa: B023
                    copies, args.repeats,
                )  # fmt: skip
            best: tuple[float, GemvConfig] | None = None
            for cfg in sweep(m) if args.sweep else []:
                seconds = time_graph(
                    lambda i, cfg=cfg, x=x: gemv(x, weights[i], cfg),  # noqa: B023
                    copies, args.repeats,
                )  # fmt: skip
                entry["configs"].append({"config": str(cfg), "s": seconds})
                if best is None or seconds < best[0]:
                    best = (seconds, cfg)
            results[f"{name}/M={m}"] = entry
            tbs = weight_bytes / 1e12
            cells = [entry["cublas_s"], entry["default_pdl_False_s"], entry["default_pdl_True_s"]]
            row = [name, str(m)] + [f"{1e6 * t:.1f} ({tbs / t:.2f})" for t in cells]
            if best is not None:
                c = best[1]
                row.append(f"{1e6 * best[0]:.1f} {c.block_n}/{c.block_k}/{c.num_warps}")
            table.append(row)
            print(row, flush=True)
        weights.clear()
        torch.cuda.empty_cache()
    gemv_module.USE_PDL = True
    text = markdown_table(
        ["proj", "M", "cuBLAS us (TB/s)", "gemv", "gemv + PDL"]
        + (["sweep best, BN/BK/warps"] if args.sweep else []),
        table,
    )
    device = torch.cuda.get_device_name()
    print(f"\nLlama-3-8B projections, bf16, {device}\n{text}")
    write_json(args.out, {"machine": machine_info(), "device": device, "results": results,
                          "table": text, "default": str(default_config(1, 1, 1))})  # fmt: skip


if __name__ == "__main__":
    main()
