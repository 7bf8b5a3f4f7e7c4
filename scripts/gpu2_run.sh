#!/usr/bin/env bash
# One device call for issues 19/20/21 (Llama-3-8B shape, dummy weights, one GPU): each step
# gets what is left of a wall-clock budget. Steps (in order, any subset): planner, profile,
# fp8tests, fp8kernels, fp8engine, serve. Output: short tables on stdout, files under $OUT.
#
#   BUDGET_S=570 scripts/gpu2_run.sh planner profile fp8tests fp8kernels fp8engine
set -uo pipefail
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET_S:-570} STEP_MARGIN_S=15
source "$(dirname "${BASH_SOURCE[0]}")/device_budget.sh"  # left, step
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
# everything goes to $W; the few files worth keeping are copied to $OUT at the end (8 come back)
W=/tmp/gpu2; rm -rf $W; mkdir -p $W; RES=$OUT; OUT=$W
pv=
for what in "$@"; do case $what in
planner)
  mkdir -p "$OUT/planner-h100"
  (timeout $(($(left) - 20)) python -m bench.planner_validation --h100 --out "$OUT/planner-h100" \
    > "$OUT/planner.log" 2>&1; echo "planner rc=$?" >> "$OUT/planner.log") &
  pv=$!
  for _ in $(seq 300); do [[ -f $OUT/planner-h100/profile.json ]] && break
    kill -0 $pv 2>/dev/null || break; sleep 1; done
  echo "planner profile after $(($(date +%s) - start)) s"; grep -E "^(prefill|decode|transfer)" "$OUT/planner.log"
  sleep 5 ;;  # the profiling process exits and frees the GPU; the plan runs on the CPU
profile)
  step 330 python -m bench.engine_profile --variants "${PROFILE_VARIANTS:-default}" --saturation-requests 0 \
    --out "$OUT/engine_profile.json" > "$OUT/engine_profile.log" 2>&1
  grep -A70 "^| llama" "$OUT/engine_profile.log" | grep -v "^$" || tail -20 "$OUT/engine_profile.log" ;;
fp8tests)
  step 150 python -m pytest -q -p no:cacheprovider tests/unit/kernels/test_fp8_gemv.py \
    tests/gpu/test_fp8_gpu.py 2>&1 | tail -6 ;;
fp8kernels)
  step 150 python -m bench.kernels_gemv --fp8 --rows "${FP8_ROWS:-1}" --sweep --repeats 10 \
    --out "$OUT/kernels_gemv_fp8.json" 2>&1 | grep -v "^  Fp8GemvConfig" | tail -16 ;;
fp8engine)
  tiles=; [[ -f $OUT/kernels_gemv_fp8.json ]] && tiles="--fp8-gemv-tiles $OUT/kernels_gemv_fp8.json"
  step 330 python -m bench.fp8_gpu --variants "${FP8_VARIANTS:-bf16,w8,w8+gemv}" --repeats 2 \
    --saturation-requests 0 $tiles --out "$OUT/fp8_gpu.json" 2>&1 | tail -14 ;;
serve)
  step 300 python -m bench.serve_vs_engine --out "$OUT/serve" > "$OUT/serve.log" 2>&1
  tail -4 "$OUT/serve.log" ;;
esac; done
if [[ -n $pv ]]; then wait $pv; grep -B2 -A14 "^predicted" "$OUT/planner.log" || tail -15 "$OUT/planner.log"; fi
cp $W/planner-h100/profile.json $RES/planner_profile.json 2>/dev/null
cp $W/planner-h100/validation.md $RES/planner_validation.md 2>/dev/null
cp $W/planner.log $W/engine_profile.json $W/kernels_gemv_fp8.json $W/fp8_gpu.json $RES/ 2>/dev/null
cp $W/serve/summary.json $RES/serve_summary.json 2>/dev/null
tail -c 20000 $W/serve/serve.log > $RES/serve_tail.log 2>/dev/null
ls $RES
