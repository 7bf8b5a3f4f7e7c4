"""What FP8 does to the default model's predictions: perplexity and teacher-forced top-1
agreement with fp32, for FP8 weights, FP8 KV cache and both (and bf16, for scale: what 8 bits
of mantissa already change), on a fixed English text (the standard library's pydoc topics).
Deterministic: no sampling, no timing; `measure()` is what
tests/integration/test_fp8_fidelity.py calls. Method: docs/benchmarks.md.

    python -m bench.fp8_fidelity [--num-tokens 4096] [--window 512]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import torch

_W8 = {"quantization": "fp8"}
_KV8 = {"kv_cache_dtype": "fp8"}  # per-head scales, calibrated: the default
_GPTQ = {"fp8_weight_calibration": "gptq"}
CONFIGS: dict[str, dict[str, str]] = {  # name -> EngineConfig fields beside the fp32 defaults
    "fp32": {},
    "bf16": {"dtype": "bfloat16"},  # no FP8 at all: what 8 bits of mantissa change
    "fp8 weights": _W8,
    "fp8 kv": _KV8,
    "fp8 kv per-token": {**_KV8, "kv_cache_scales": "per_token"},
    "fp8 both": {**_W8, **_KV8},
    "fp8 weights gptq": {**_W8, **_GPTQ},
    "fp8 both gptq": {**_W8, **_KV8, **_GPTQ},
}


@dataclass(frozen=True, slots=True)
class Fidelity:
    name: str
    perplexity: float
    ppl_increase_pct: float  # relative to fp32
    top1_agreement: float  # with fp32's argmax
    num_positions: int


def pydoc_text() -> str:
    """The fixed text: every help() topic of this Python, sorted by name."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def engine_for(options: dict[str, str], window: int) -> object:
    """A CPU engine of the default model in fp32 with `options` (EngineConfig fields) over it,
    a cache that holds one window."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    fields = {"device": "cpu", "dtype": "float32", **options}
    return Engine(
        EngineConfig(num_kv_blocks=-(-window // 16) + 1, enable_prefix_caching=False, **fields)  # type: ignore[arg-type]
    )


def window_logits(engine: object, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] logits (model dtype) of every position, the window prefilled as one chunk."""
    from contracts.block_hash import root_hash
    from contracts.sampling_params import SamplingParams
    from engine.scheduler import ScheduledSequence
    from engine.sequence import Sequence

    seq = Sequence("fidelity", token_ids, SamplingParams(), root_hash("fidelity"))
    assert engine.block_manager.allocate_slots(seq, len(token_ids))  # type: ignore[attr-defined]
    item = ScheduledSequence(seq, len(token_ids))
    runner, model = engine.runner, engine.model  # type: ignore[attr-defined]
    with torch.inference_mode():
        input_ids, positions, meta = runner.prepare_inputs([], [item])
        logits = model.compute_logits(model(input_ids, positions, runner.kv_cache, meta))
    engine.block_manager.free(seq)  # type: ignore[attr-defined]
    return logits


def measure(
    num_tokens: int, window: int, names: tuple[str, ...] = tuple(CONFIGS)
) -> list[Fidelity]:
    """Fidelity of each named config against fp32 (always measured first)."""
    names = ("fp32", *(n for n in names if n != "fp32"))
    windows: list[list[int]] = []
    nll: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    argmax: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for name in names:
        engine = engine_for(CONFIGS[name], window)
        if not windows:
            ids = engine.tokenizer.encode(pydoc_text())[:num_tokens]  # type: ignore[attr-defined]
            windows = [ids[i : i + window] for i in range(0, len(ids), window)]
            windows = [w for w in windows if len(w) > 1]
        for w in windows:
            logits = window_logits(engine, w)[:-1].float()  # position i predicts token i + 1
            target = torch.tensor(w[1:])
            nll[name].append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
            argmax[name].append(logits.argmax(dim=-1))
        del engine
    base_ppl = math.exp(torch.cat(nll["fp32"]).mean().item())
    base_top = torch.cat(argmax["fp32"])
    results = []
    for name in names:
        ppl = math.exp(torch.cat(nll[name]).mean().item())
        agree = (torch.cat(argmax[name]) == base_top).float().mean().item()
        pct = 100 * (ppl / base_ppl - 1)
        results.append(Fidelity(name, ppl, pct, agree, base_top.numel()))
    return results


def main() -> None:
    from bench.common import machine_info, markdown_table, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", default="bench/results/fp8_fidelity.json")
    args = parser.parse_args()
    results = measure(args.num_tokens, args.window)
    rows = [
        (
            r.name,
            f"{r.perplexity:.3f}",
            f"{r.ppl_increase_pct:+.2f}%",
            f"{100 * r.top1_agreement:.2f}%",
        )
        for r in results
    ]
    print(f"{results[0].num_positions} positions, windows of {args.window} tokens")
    print(markdown_table(("config", "perplexity", "vs fp32", "top-1 agreement"), rows))
    data = {"args": vars(args), "results": [asdict(r) for r in results], "machine": machine_info()}
    print(f"wrote {write_json(args.out, data)}")


if __name__ == "__main__":
    main()
