#!/usr/bin/env bash
# Issue 25 on a machine of 2 or more GPUs (Llama-3-8B shape, dummy weights), in device calls of
# at most 10 minutes: each call runs the steps it names, in order, each within what is left of
# a wall-clock budget (scripts/device_budget.sh). Steps, and about how long each takes:
#
#   tests        tests/gpu/test_tensor_parallel_gpu.py (TP=2 over NCCL with CUDA graphs and
#                eager, TP=2 on one GPU over gloo, KV moved TP=2 <-> TP=1) and
#                tests/gpu/test_kvtransfer_nccl.py                                     ~4 min
#   transfer     bench.kvtransfer_nccl, bf16 KV then FP8 KV (TRANSFER_ARGS adds flags) ~6 min
#   tp           bench.engine_gpu --tensor-parallel-size $TP (TP=1 in the same run) and
#                bench.tp_kv_move --tp $TP (gather to / scatter from rank 0)           ~6 min
#   disagg-mixed bench.disagg_experiment on $GPUS GPUs: $DISAGG_CONFIGS (default colocated,
#                planner-split,auto; the planner over bench/data/h100_planner_profile_v2.json),
#                the mixed workload                                                    ~8 min
#   disagg-long  the same on the long-prompt mix (4k-8k in, ~256 out)                  ~8 min
#   drain        bench.drain --device cuda, dummy SmolLM2 shape: colocated; disaggregated
#                too with 3+ GPUs (one prefill + two decode workers)                   ~3 min
#   chaos        bench.chaos --device cuda, dummy SmolLM2 shape, colocated; needs
#                redis-server on the machine (skipped, saying so, without it)          ~5 min
#
# Everything is written under $W; $OUT gets summary.md (one row per step: rc, seconds, the
# headline lines), results.tar.gz (every JSON and log) and each step's log (8 files come back
# at most). With the project's wheels: `source .device/setup.sh; scripts/multi_gpu_run.sh tests`.
#
#   BUDGET_S=570 scripts/multi_gpu_run.sh tests
#   TP=2 scripts/multi_gpu_run.sh tp
#   DISAGG_CONFIGS=colocated,auto DISAGG_RATES=16,32,48,64 scripts/multi_gpu_run.sh disagg-mixed
#   DRY_RUN=1 scripts/multi_gpu_run.sh transfer disagg-mixed   # on the CPU: a check of the script
set -uo pipefail
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET_S:-570} STEP_MARGIN_S=15
source "$(dirname "${BASH_SOURCE[0]}")/device_budget.sh"  # left, step
DRY=${DRY_RUN:-}  # on the CPU: gloo, the default model, tiny sizes (not a measurement)
OUT=${OUT:-/tmp/multi_gpu_out}; mkdir -p "$OUT"
W=${WORK_DIR:-/tmp/multi_gpu}; mkdir -p "$W"
if [[ -n $DRY ]]; then NGPU=0; else
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  NGPU=$(nvidia-smi -L | wc -l)
fi
GPUS=${GPUS:-$((NGPU < 2 ? 2 : NGPU))} TP=${TP:-2}
echo "| step | rc | s | headline |" > "$W/summary.md"; echo "|---|---|---|---|" >> "$W/summary.md"
logs=()

record() {  # record STEP RC STARTED LOG PATTERN: a summary row with the log's matching lines
  local lines; lines=$(grep -E "$5" "$4" 2>/dev/null | tail -"${6:-6}" | cut -c1-220 | tr '\n' ';')
  echo "| $1 | $2 | $(($(date +%s) - $3)) | ${lines//|/\\|} |" >> "$W/summary.md"
  logs+=("$4")
}

run_tests() {
  local t0; t0=$(date +%s)
  step "${TESTS_S:-330}" python -m pytest -q -rfs -p no:cacheprovider \
    tests/gpu/test_tensor_parallel_gpu.py tests/gpu/test_kvtransfer_nccl.py > "$W/tests.log" 2>&1
  record tests $? "$t0" "$W/tests.log" "^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|skipped)" 12
}

run_transfer() {  # bf16 KV, then FP8 KV (half the bytes on the wire)
  local t0 dtype extra
  for dtype in bf16 fp8; do
    t0=$(date +%s)
    if [[ -n $DRY ]]; then extra=(--cpu-dry-run --lengths 64,200 --repeats 1 --raw-modes coalesced)
    else extra=(--shapes llama-3-8b --lengths 2048,8192 --repeats 5 --raw-modes coalesced,one_part/bare
      --protocol-modes 1024,64 --overlap-layers-per-chunk 2,4 --overlap-repeats 10); fi
    # shellcheck disable=SC2086  # TRANSFER_ARGS: flags, split on spaces
    step "${TRANSFER_S:-270}" python -m bench.kvtransfer_nccl "${extra[@]}" --kv-dtype $dtype \
      ${TRANSFER_ARGS:-} --out "$W/kvtransfer_$dtype.json" > "$W/kvtransfer_$dtype.log" 2>&1
    record "transfer $dtype" $? "$t0" "$W/kvtransfer_$dtype.log" "GB/s|hidden|not bit-exact" 8
  done
}

run_tp() {
  local t0; t0=$(date +%s)
  if [[ -n $DRY ]]; then  # the GPU bench refuses the CPU: its plan is unit-tested instead
    step 60 python -m bench.engine_gpu --tensor-parallel-size "$TP" --baselines none \
      > "$W/engine_gpu_tp.log" 2>&1
  else
    step "${ENGINE_S:-330}" python -m bench.engine_gpu --shape llama-3-8b --tensor-parallel-size \
      "$TP" --baselines none --batch-sizes 1,16,64 --repeats 3 --out "$W/engine_gpu_tp$TP.json" \
      > "$W/engine_gpu_tp.log" 2>&1
  fi
  record "engine_gpu TP=1 vs TP=$TP" $? "$t0" "$W/engine_gpu_tp.log" "^\| (decode|batch 1|TTFT|speed-up)|tensor parallel|Error|bench.engine_gpu:" 12
  t0=$(date +%s)
  local model=dummy:llama-3-8b device=cuda tokens=2048; [[ -n $DRY ]] && model=dummy:tiny device=cpu tokens=64
  step "${TP_MOVE_S:-200}" python -m bench.tp_kv_move --model $model --device $device --tp "$TP" \
    --prompt-tokens $tokens --repeats 10 --out "$W/tp_kv_move.json" > "$W/tp_kv_move.log" 2>&1
  record "tp_kv_move TP=$TP" $? "$t0" "$W/tp_kv_move.log" "^\||Error" 6
}

run_disagg() {  # run_disagg WORKLOAD DEFAULT_RATES
  local t0 name=disagg-$1 model=dummy:llama-3-8b extra=(); t0=$(date +%s)
  if [[ -n $DRY ]]; then extra=(--cpu-dry-run --num-warmup 1); model=default; fi
  step "${DISAGG_S:-560}" python -m bench.disagg_experiment --model $model --gpus "$GPUS" \
    --workload "$1" --configurations "${DISAGG_CONFIGS:-colocated,planner-split,auto}" \
    --rates "${DISAGG_RATES:-$2}" --num-prompts "${DISAGG_PROMPTS:-${3}}" "${extra[@]}" \
    --out "$W/$name" > "$W/$name.log" 2>&1
  record "$name" $? "$t0" "$W/$name.log" "recommends|not run again|serving after|^\| (goodput|SLO att|TTFT p99|ITL p99)" 14
}

run_drain() {
  local t0 device=cuda model=dummy:smollm2-135m; t0=$(date +%s)
  [[ -n $DRY ]] && device=cpu model=dummy:tiny
  local modes=(colocated); ((NGPU >= 3)) && modes+=(disaggregated)
  for mode in "${modes[@]}"; do
    t0=$(date +%s)
    step "${DRAIN_S:-240}" python -m bench.drain --model $model --device $device --mode "$mode" \
      --streams 32 --max-tokens 128 --cut-after 32 --cases kv,replay \
      --output "$W/drain_$mode.json" > "$W/drain_$mode.log" 2>&1
    record "drain $mode" $? "$t0" "$W/drain_$mode.log" '^\{|Error' 4
  done
}

run_chaos() {
  local t0; t0=$(date +%s)
  if ! command -v redis-server > /dev/null; then
    echo "| chaos | - | 0 | SKIPPED: no redis-server on this machine |" >> "$W/summary.md"; return
  fi
  # on GPUs streams of 256-768 tokens take seconds: arrivals and kills within the first 6 s
  local device=cuda model=dummy:smollm2-135m
  local load=(--min-tokens 256 --max-tokens 768 --arrival-s 3 --duration-s 6 --num-kv-blocks 8192)
  [[ -n $DRY ]] && device=cpu model=dummy:tiny load=(--duration-s 20)
  step "${CHAOS_S:-420}" python -m bench.chaos --model $model --device $device --mode colocated \
    --num-workers 2 --num-requests 24 --decode-kills 2 --redis-restarts 1 "${load[@]}" \
    --seed 1 --out "$W/chaos_colocated.json" > "$W/chaos.log" 2>&1
  record chaos $? "$t0" "$W/chaos.log" "must be 0|migrated|back to size" 6
}

STEPS="tests transfer tp disagg-mixed disagg-long drain chaos"
for what in "$@"; do  # every name checked before anything runs
  [[ " $STEPS " == *" $what "* ]] || { echo "unknown step $what (one of: $STEPS)"; exit 2; }
done
for what in "$@"; do case $what in
  tests) run_tests ;;
  transfer) run_transfer ;;
  tp) run_tp ;;
  disagg-mixed) run_disagg mixed 16,32,48,64 128 ;;
  disagg-long) run_disagg long-prompt 2,4,6,8 48 ;;
  drain) run_drain ;;
  chaos) run_chaos ;;
esac; done
tar czf "$OUT/results.tar.gz" -C "$W" . 2>/dev/null
cp "$W/summary.md" "$OUT/"
for log in "${logs[@]:0:6}"; do tail -c 200000 "$log" > "$OUT/$(basename "$log")"; done
echo; cat "$W/summary.md"
