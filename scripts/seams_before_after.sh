#!/usr/bin/env bash
# Issue 18 before/after on this CPU: `tandem serve` (colocated or disaggregated) + `tandem bench`
# for two checkouts in turn (ABAB), then bench.engine_cpu for each.
#
#   BEFORE=<checkout> AFTER=<checkout> OUT=<dir> [REPS="1 2"] [MODES="colocated disaggregated"]
#   [CONC=8] [NUM=48] [SKIP_ENGINE=1] [ENGINE_ORDER="before after"] scripts/seams_before_after.sh
#
# Uses this checkout's virtualenv (scripts/setup.sh); each run imports its checkout by PYTHONPATH.
# AFTER_ARGS: extra `tandem serve` flags for the after checkout only; a checkout with per-request
# prefill placement (issue 21) needs AFTER_ARGS="--disagg always" to compare the same path.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=$here/.venv/bin/python; TANDEM=$here/.venv/bin/tandem
mkdir -p "$OUT"
declare -A TREE=([before]=$BEFORE [after]=$AFTER)
serve_and_bench() {  # name mode rep
  local name=$1 mode=$2 rep=$3 port=$((52000 + RANDOM % 1000))
  local args=(--port "$port")
  [[ $mode == disaggregated ]] && args+=(--mode disaggregated --prefill-workers 1 --decode-workers 1)
  # shellcheck disable=SC2206  # AFTER_ARGS is a list of flags
  [[ $name == after && $mode == disaggregated ]] && args+=(${AFTER_ARGS:-})
  (cd "${TREE[$name]}" && PYTHONPATH="${TREE[$name]}" exec "$TANDEM" serve "${args[@]}" > "$OUT/serve-$name-$mode-$rep.log" 2>&1) &
  local pid=$!
  for _ in $(seq 240); do grep -q "serving\|Serving\|listening" "$OUT/serve-$name-$mode-$rep.log" 2>/dev/null && break; sleep 1; done
  sleep 2
  (cd "${TREE[$name]}" && PYTHONPATH="${TREE[$name]}" "$TANDEM" bench --target 127.0.0.1:$port --workload random \
     --input-len 256 --output-len 32 --num-prompts ${NUM:-48} --concurrency ${CONC:-8} --num-warmup 4 --seed 1 \
     --no-plot --label "$name-$mode" --output "$OUT/bench-$name-$mode-$rep.json" > "$OUT/bench-$name-$mode-$rep.log" 2>&1)
  kill -TERM $pid; wait $pid
}
for rep in ${REPS:-1 2}; do for mode in ${MODES:-colocated disaggregated}; do for name in before after; do
  serve_and_bench $name $mode $rep
done; done; done
[[ -n "${SKIP_ENGINE:-}" ]] && exit 0
for name in ${ENGINE_ORDER:-before after before after}; do
  (cd "${TREE[$name]}" && PYTHONPATH="${TREE[$name]}" $PY -m bench.engine_cpu --skip-transformers --prompt-len 128 --new-tokens 32 --batch-sizes 8 --repeats 3 --stagger-requests 4 --out "$OUT/engine-$name-$RANDOM.json" >> "$OUT/engine-$name.log" 2>&1)
done
echo done
