"""Where fusion pays: the fused Triton kernels (rms_norm, rotary, silu_and_mul) against their
torch `<op>_ref`, eager and under torch.compile, at Llama-3-8B shapes per token count, timed
per call (launch overhead shows) and from CUDA-graph replays (GPU time only), with effective
bandwidth. Each kernel is checked against its reference first. CUDA only. Method:
docs/benchmarks.md.

    python -m bench.kernels_fused_ops [--tokens 1,64,2048] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import machine_info, markdown_table, write_json

HIDDEN_SIZE = 4096
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
INTERMEDIATE_SIZE = 14336
MAX_POSITIONS = 8192
EPS = 1e-5
SYSTEMS = ("triton", "eager", "compile")


@dataclass(frozen=True, slots=True)
class Case:
    """One op at one size: a callable per system and the bytes an ideal kernel moves."""

    op: str
    num_tokens: int
    calls: dict[str, Callable[[], Any]]
    num_bytes: int


def rms_norm_case(num_tokens: int, dtype: torch.dtype) -> Case:
    from engine.kernels.rms_norm import rms_norm, rms_norm_ref

    x = torch.randn(num_tokens, HIDDEN_SIZE, device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    weight = 1 + 0.1 * torch.randn(HIDDEN_SIZE, device="cuda", dtype=dtype)
    out = torch.empty_like(x)
    expected = rms_norm_ref(x, weight, EPS, residual)[0]
    torch.testing.assert_close(rms_norm(x, weight, EPS, residual.clone())[0], expected)
    compiled = torch.compile(rms_norm_ref, dynamic=False)
    return Case(
        "rms_norm+residual",
        num_tokens,
        {
            "triton": lambda: rms_norm(x, weight, EPS, residual, out=out),
            "eager": lambda: rms_norm_ref(x, weight, EPS, residual),
            "compile": lambda: compiled(x, weight, EPS, residual),
        },
        # read x, residual; write out, residual; read weight
        num_bytes=(4 * num_tokens + 1) * HIDDEN_SIZE * x.element_size(),
    )


def rotary_case(num_tokens: int, dtype: torch.dtype) -> Case:
    from engine.kernels.rotary import apply_rotary_, apply_rotary_ref

    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device="cuda", dtype=dtype)
    q = qkv[:, :q_size].view(num_tokens, NUM_HEADS, HEAD_DIM)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), device="cuda")
    angles = torch.rand(MAX_POSITIONS, HEAD_DIM // 2, device="cuda") * 6.3
    cos2 = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin2 = torch.cat([-angles.sin(), angles.sin()], dim=-1)
    expected_q, expected_k = apply_rotary_ref(q, k, positions, cos2, sin2)
    q_check, k_check = q.clone(), k.clone()
    apply_rotary_(q_check, k_check, positions, cos2, sin2)
    torch.testing.assert_close((q_check, k_check), (expected_q, expected_k))
    compiled = torch.compile(apply_rotary_ref, dynamic=False)
    return Case(
        "rotary",
        num_tokens,
        {
            "triton": lambda: apply_rotary_(q, k, positions, cos2, sin2),
            "eager": lambda: apply_rotary_ref(q, k, positions, cos2, sin2),
            "compile": lambda: compiled(q, k, positions, cos2, sin2),
        },
        # read and write q and k; read a cos and a sin row per token (fp32)
        num_bytes=num_tokens
        * (2 * (q_size + kv_size) * qkv.element_size() + 2 * HEAD_DIM * cos2.element_size()),
    )


def silu_and_mul_case(num_tokens: int, dtype: torch.dtype) -> Case:
    from engine.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

    gate_up = torch.randn(num_tokens, 2 * INTERMEDIATE_SIZE, device="cuda", dtype=dtype)
    out = torch.empty(num_tokens, INTERMEDIATE_SIZE, device="cuda", dtype=dtype)
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up))
    compiled = torch.compile(silu_and_mul_ref, dynamic=False)
    return Case(
        "silu_and_mul",
        num_tokens,
        {
            "triton": lambda: silu_and_mul(gate_up, out=out),
            "eager": lambda: silu_and_mul_ref(gate_up),
            "compile": lambda: compiled(gate_up),
        },
        # read gate and up, write out
        num_bytes=3 * num_tokens * INTERMEDIATE_SIZE * gate_up.element_size(),
    )


CASE_BUILDERS = (rms_norm_case, rotary_case, silu_and_mul_case)


def time_us(fn: Callable[[], Any], mode: str) -> dict[str, float] | None:
    """{median, p20, p80} in microseconds, or None if the call cannot be graph-captured."""
    import triton.testing

    quantiles = [0.5, 0.2, 0.8]
    if mode == "stream":
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=quantiles)
    else:
        try:
            ms = triton.testing.do_bench_cudagraph(fn, rep=200, quantiles=quantiles)
        except RuntimeError as e:  # e.g. a compiled function that will not capture
            log(f"graph capture failed: {e}")
            torch.cuda.synchronize()
            return None
    return {name: 1000 * v for name, v in zip(("median", "p20", "p80"), ms, strict=True)}


def run(settings: argparse.Namespace) -> dict[str, Any]:
    torch._dynamo.config.cache_size_limit = 64  # one compile per (op, size)
    dtype = getattr(torch, settings.dtype)
    results = []
    for build in CASE_BUILDERS:
        for num_tokens in settings.tokens:
            case = build(num_tokens, dtype)
            log(f"{case.op} tokens={num_tokens}")
            for fn in case.calls.values():  # compile and autotune outside the timings
                fn()
            torch.cuda.synchronize()
            timings = {
                mode: {system: time_us(case.calls[system], mode) for system in SYSTEMS}
                for mode in ("stream", "graph")
            }
            results.append(
                {
                    "op": case.op,
                    "num_tokens": num_tokens,
                    "num_bytes": case.num_bytes,
                    "timings_us": timings,
                }
            )
    return {
        "settings": {**vars(settings), "hidden_size": HIDDEN_SIZE, "head_dim": HEAD_DIM},
        "machine": machine_info(packages=("torch", "triton")),
        "results": results,
    }


def render(data: dict[str, Any]) -> str:
    tables = []
    for mode in ("stream", "graph"):
        rows = []
        for r in data["results"]:
            t = r["timings_us"][mode]
            triton_us = t["triton"]["median"]
            rows.append(
                [
                    r["op"],
                    str(r["num_tokens"]),
                    *(_us(t[s]) for s in SYSTEMS),
                    _ratio(t["eager"], triton_us),
                    _ratio(t["compile"], triton_us),
                    f"{r['num_bytes'] / (triton_us * 1e3):.0f}",
                ]
            )
        headers = ["op", "tokens", *(f"{s} us" for s in SYSTEMS)]
        headers += ["eager/triton", "compile/triton", "triton GB/s"]
        tables.append(f"## {mode} timing (median (p20-p80) us)\n\n{markdown_table(headers, rows)}")
    return "\n\n".join(tables)


def _us(t: dict[str, float] | None) -> str:
    return "n/a" if t is None else f"{t['median']:.1f} ({t['p20']:.1f}-{t['p80']:.1f})"


def _ratio(t: dict[str, float] | None, triton_us: float) -> str:
    return "n/a" if t is None else f"{t['median'] / triton_us:.2f}x"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=_int_list, default=[1, 64, 2048])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--out", default="bench/results/kernels_fused_ops.json")
    return p.parse_args(argv)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,64, got {text!r}")
    return values


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.kernels_fused_ops needs a CUDA device")
    data = run(settings)
    path = write_json(settings.out, data)
    print(render(data))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
