#!/usr/bin/env bash
# Issue 19's GPU run in one go (Llama-3-8B shape, dummy bf16 weights, one GPU): every engine
# row of the issue's table for a BEFORE checkout and for this one, same machine, same run;
# then the GPU tests, the GEMV micro-benchmark and per-step breakdowns of this checkout's
# variants (bench.engine_profile).
#
#   scripts/engine_speed_gpu.sh BEFORE_CHECKOUT OUT_DIR
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
(cd "$before" && PYTHONPATH="$before:$base_path" timeout 90 python -m bench.engine_gpu \
    --baselines none --batch-sizes 1,64 --repeats 3 --out "$out/before_gpu.json" 2>&1 | tail -9)
(cd "$before" && PYTHONPATH="$before:$base_path" timeout 100 python -m bench.engine_saturation \
    --baseline-batch 0 --out "$out/before_sat.json" 2>&1 | tail -7)
run 180 python -m bench.engine_gpu --baselines none --batch-sizes 1,64 --repeats 3 \
    --saturation-requests 512 --out "$out/after.json" 2>&1 | tail -10
run 150 python -m pytest -x -q -p no:cacheprovider tests/gpu/test_engine_gpu.py \
    tests/unit/kernels/test_gemv.py 2>&1 | tail -8
run 45 python -m bench.kernels_gemv --rows 1 --out "$out/gemv.json" 2>&1 | tail -8
run 120 python -m bench.engine_profile --variants new,new-nopdl,new-nodense \
    --saturation-requests 0 --out "$out/profile.json" 2>&1 | grep -v '^new' | tail -34
