#!/usr/bin/env bash
# Issue 19's GPU run in one go (Llama-3-8B shape, dummy bf16 weights, one GPU): every engine
# row of the issue's table for a BEFORE checkout and for this one, same machine, same run;
# then the GPU tests, the GEMV micro-benchmark and per-step breakdowns of this checkout's
# variants (bench.engine_profile).
#
#   [REPEATS=2 SAT_REPEATS=2 SKIP_EXTRA=] scripts/engine_speed_gpu.sh BEFORE_CHECKOUT OUT_DIR
#
# BEFORE_CHECKOUT: a checkout of the code to compare against (its bench/engine_gpu.py and
# bench/engine_saturation.py are used for its numbers). Run from this checkout's root.
set -uo pipefail
before=$1 out=$2
here=$PWD
export PYTHONUNBUFFERED=1
base_path=${PYTHONPATH:-}
run() { PYTHONPATH="$here:$base_path" timeout "$@"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
echo "before: $(git -C "$before" log --oneline -1 2>/dev/null)"
reps=${REPEATS:-2} sat_reps=${SAT_REPEATS:-2}
run 180 python -m bench.engine_gpu --baselines none --batch-sizes 1,64 --repeats "$reps" \
    --saturation-requests 512 --saturation-repeats "$sat_reps" --out "$out/after.json" 2>&1 \
    | tail -10
(cd "$before" && PYTHONPATH="$before:$base_path" timeout 90 python -m bench.engine_gpu \
    --baselines none --batch-sizes 1,64 --repeats "$reps" --out "$out/before_gpu.json" 2>&1 \
    | tail -9)
(cd "$before" && PYTHONPATH="$before:$base_path" timeout 100 python -m bench.engine_saturation \
    --baseline-batch 0 --repeats "$sat_reps" --out "$out/before_sat.json" 2>&1 | tail -7)
run 200 python -m pytest -q -p no:cacheprovider tests/gpu/test_engine_gpu.py \
    tests/unit/kernels/test_gemv.py 2>&1 | tail -15
[[ -n "${SKIP_EXTRA:-}" ]] && exit 0
run 45 python -m bench.kernels_gemv --rows 1 --out "$out/gemv.json" 2>&1 | tail -8
run 150 python -m bench.engine_profile --variants default+gemv,default+gemv+pdl,default+gemv+dense,default+gemv-pinned,default \
    --saturation-requests 0 --out "$out/profile.json" 2>&1 | grep -v "^default" | tail -34
