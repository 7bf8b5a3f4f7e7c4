#!/usr/bin/env bash
# One device call for issues 19/20 (Llama-3-8B shape, dummy weights, one GPU): each step gets
# what is left of a wall-clock budget. Steps (in order, any subset): tests, fp8, sat, sdpa,
# profile.
# Output: short tables on stdout, logs and JSON under $OUT. FP8_ARGS: more bench.fp8_gpu options.
#
#   BUDGET_S=560 FP8_VARIANTS=bf16,w8+gemv SAT_VARIANTS=bf16 scripts/gpu3_run.sh tests fp8 sat
set -uo pipefail
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET_S:-560} STEP_MARGIN_S=10
source "$(dirname "${BASH_SOURCE[0]}")/device_budget.sh"  # left, step
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
for what in "$@"; do case $what in
tests)
  step "${TESTS_S:-170}" python -m pytest -q -rf -p no:cacheprovider ${TESTS:-tests/gpu/test_fp8_gpu.py \
    tests/gpu/test_engine_gpu.py tests/unit/kernels/test_fused_fp8_quant.py \
    tests/unit/kernels/test_rms_norm.py tests/unit/kernels/test_silu_and_mul.py \
    tests/unit/kernels/test_gemv.py tests/unit/kernels/test_fp8_gemv.py \
    tests/unit/kernels/test_fp8_quant.py} > "$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -25 ;;
fp8)
  step "${FP8_S:-330}" python -m bench.fp8_gpu --variants "${FP8_VARIANTS:-bf16,w8+gemv}" \
    --repeats "${FP8_REPEATS:-2}" --saturation-requests 0 ${FP8_ARGS:-} --out "$OUT/fp8_gpu.json" \
    > "$OUT/fp8_gpu.log" 2>&1
  grep -E "^[a-z0-9+]+ \{|^\||^NVIDIA|Error|error" "$OUT/fp8_gpu.log" | cut -c1-400 | tail -30 ;;
sat)
  step "${SAT_S:-300}" python -m bench.engine_saturation --variants "${SAT_VARIANTS:-bf16}" \
    --num-requests "${SAT_REQUESTS:-512}" --repeats "${SAT_REPEATS:-2}" --baseline-batch 0 \
    --out "$OUT/engine_saturation.json" > "$OUT/engine_saturation.log" 2>&1
  tail -12 "$OUT/engine_saturation.log" ;;
sdpa)
  step "${SDPA_S:-60}" python -m bench.sdpa_backends > "$OUT/sdpa_backends.log" 2>&1
  cut -c1-300 "$OUT/sdpa_backends.log" | tail -12 ;;
profile)
  step "${PROFILE_S:-150}" python -m bench.engine_profile --variants "${PROFILE_VARIANTS:-default}" \
    --decode-batches "${PROFILE_BATCHES:-1,64}" --saturation-requests 0 \
    --out "$OUT/engine_profile.json" > "$OUT/engine_profile.log" 2>&1
  grep -E "^\|" "$OUT/engine_profile.log" | cut -c1-300 | tail -40 ;;
esac; done
ls "$OUT"
