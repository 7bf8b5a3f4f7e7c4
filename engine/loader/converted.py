"""The converted-model cache: what loading a GGUF file computes (parsed metadata, dequantized and
fused parameters), kept under `cache_dir()/converted/<stem>-<key>/` for the next load. The key
hashes the file's path, size and mtime with FORMAT_VERSION; a repeated load reads each parameter
straight into the model's tensor. Derived data only: a missing or mismatched entry is converted
again, a failed write only warns, and entries are renamed into place (index last) so concurrent
loaders never read half an entry. Files: docs/engine.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.loader.default_model import cache_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_READ_CHUNK_BYTES = 16 << 20


def entry_dir(gguf_path: Path) -> Path:
    """The cache folder of one GGUF file as it is now (path, size, modification time)."""
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    identity = f"{FORMAT_VERSION}\0{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{resolved.stem}-{key}"


def read_metadata(gguf_path: Path) -> tuple[dict[str, Any], set[str]] | None:
    """(metadata, tensor names) as stored for this file, or None if not stored."""
    try:
        stored = json.loads((entry_dir(gguf_path) / "metadata.json").read_text())
        return stored["metadata"], set(stored["tensor_names"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_metadata(gguf_path: Path, metadata: dict[str, Any], tensor_names: set[str]) -> None:
    """Store what `read_metadata` returns; a failure is logged, never raised."""
    document = {"metadata": metadata, "tensor_names": sorted(tensor_names)}
    with _best_effort(gguf_path, "metadata"):
        _write_atomically(entry_dir(gguf_path) / "metadata.json", [json.dumps(document).encode()])


def load_parameters(gguf_path: Path, model: torch.nn.Module) -> bool:
    """Fill every parameter of `model` (on any device, in its dtype) from the stored
    conversion. False if there is none that matches exactly (the model untouched), or if
    reading it failed part way (some parameters filled): either way the caller loads every
    parameter from the checkpoint instead."""
    import torch

    params = list(model.named_parameters())
    dtype = _dtype_name(params[0][1].dtype)
    folder = entry_dir(gguf_path)
    try:
        index = json.loads((folder / f"weights-{dtype}.json").read_text())
    except (OSError, ValueError):
        return False
    expected = [[name, list(p.shape)] for name, p in params]
    if index.get("version") != FORMAT_VERSION or index.get("parameters") != expected:
        return False
    data = folder / f"weights-{dtype}.bin"
    total = sum(p.numel() * p.element_size() for _, p in params)
    try:
        if data.stat().st_size != total:
            return False
        with open(data, "rb", buffering=0) as f:
            for _, param in params:
                _read_into(f, param, torch)
    except OSError as e:
        logger.warning("converted weights of %s unreadable (%s); converting again", gguf_path, e)
        return False
    return True


def store_parameters(gguf_path: Path, model: torch.nn.Module) -> None:
    """Store the model's parameters as converted from this file; failures only log."""
    params = list(model.named_parameters())
    dtype = _dtype_name(params[0][1].dtype)
    folder = entry_dir(gguf_path)
    index = {"version": FORMAT_VERSION, "parameters": [[n, list(p.shape)] for n, p in params]}
    with _best_effort(gguf_path, "weights"):
        _write_atomically(folder / f"weights-{dtype}.bin", (_raw_bytes(p) for _, p in params))
        _write_atomically(folder / f"weights-{dtype}.json", [json.dumps(index).encode()])


def _read_into(f: Any, param: torch.Tensor, torch: Any) -> None:
    """Read the next param.nbytes bytes of `f` into `param`, in chunks, without a full copy
    on the host (a CUDA parameter is filled through one chunk-sized host buffer)."""
    flat = param.detach().view(-1).view(torch.uint8)
    on_host = param.device.type == "cpu"
    staging = None if on_host else torch.empty(_READ_CHUNK_BYTES, dtype=torch.uint8)
    for start in range(0, flat.numel(), _READ_CHUNK_BYTES):
        size = min(_READ_CHUNK_BYTES, flat.numel() - start)
        target = flat[start : start + size] if staging is None else staging[:size]
        view = memoryview(target.numpy())  # type: ignore[arg-type]
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise OSError("file ends early")
            done += n
        if staging is not None:
            flat[start : start + size].copy_(target)


def _raw_bytes(param: torch.Tensor) -> memoryview:
    import torch

    host = param.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
    return memoryview(host.numpy())  # type: ignore[arg-type]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_atomically(target: Path, chunks: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _best_effort(gguf_path: Path, what: str) -> Iterator[None]:
    """Log a failed cache write and carry on: the cache only saves time."""
    try:
        yield
    except OSError as e:
        logger.warning("could not cache the converted %s of %s under %s: %s", what, gguf_path,
                       cache_dir(), e)  # fmt: skip
