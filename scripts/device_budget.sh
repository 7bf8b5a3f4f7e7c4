# Sourced by the device-run scripts (gpu2_run.sh, gpu3_run.sh): one wall-clock budget for a
# device call, shared by its steps. Set BUDGET (seconds) and optionally STEP_MARGIN_S (what a
# step leaves for the steps after it, default 10) before sourcing.
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
step() {  # step LIMIT_S CMD...: runs with min(LIMIT_S, what is left - STEP_MARGIN_S); its rc
  local limit=$1; shift; local l; l=$(($(left) - ${STEP_MARGIN_S:-10})); ((l < limit)) && limit=$l
  if ((limit < 20)); then echo "SKIPPED (no time): $*"; return 125; fi
  echo "== $(date +%T) [$limit s] $*"; timeout "$limit" "$@"; local rc=$?
  echo "== rc=$rc after $(($(date +%s) - start)) s"; return $rc
}
