"""Resolving a model name to its config, tokenizer and weights.

A model spec is one of:
    None / "default"       the bundled SmolLM2-135M-Instruct GGUF (fetched if missing)
    path/to/file.gguf      a GGUF file
    path/to/directory      a Hugging Face directory (config.json, *.safetensors, tokenizer.json)
    dummy:<shape>          random weights of a named shape, no tokenizer (benchmarks)

`describe_model` is torch-free (the router uses it); `load_weights` needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.errors import ModelLoadError, UnsupportedModel
from engine.loader.default_model import default_model_path
from engine.loader.hf_quant import Fp8CheckpointScheme
from engine.model_config import NAMED_SHAPES, ModelConfig
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

DUMMY_PREFIX = "dummy:"


@dataclass(frozen=True, slots=True)
class ModelSource:
    kind: str  # "gguf" | "hf" | "dummy"
    model_id: str  # names the model in prefix-cache hashes and the API
    path: Path | None
    shape_name: str | None = None  # for "dummy"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the serving side needs to know about a model without loading its weights."""

    source: ModelSource
    config: ModelConfig
    tokenizer: Tokenizer | None  # None for dummy models: they take token ids only
    fp8_scheme: Fp8CheckpointScheme | None = None  # an FP8 checkpoint's quantization


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a model spec into a source. Raises ModelLoadError for a path that does not exist."""
    if spec is None or spec == "default":
        path = default_model_path()
        return ModelSource("gguf", path.stem, path)
    if spec.startswith(DUMMY_PREFIX):
        name = spec.removeprefix(DUMMY_PREFIX)
        if name not in NAMED_SHAPES:
            raise UnsupportedModel(f"unknown dummy shape {name!r}; known: {sorted(NAMED_SHAPES)}")
        return ModelSource("dummy", spec, None, name)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path.stem, path)
    if path.is_dir():
        return ModelSource("hf", path.resolve().name, path)
    if path.exists():
        raise UnsupportedModel(f"{path} is neither a .gguf file nor a model directory")
    raise ModelLoadError(f"model not found: {spec}")


def describe_model(source: ModelSource, use_cache: bool = True) -> tuple[ModelInfo, Any]:
    """Config and tokenizer, plus an opaque handle `load_weights` reuses (a GGUFFile, parsed
    only if needed: a GGUF's metadata comes from the converted-model cache when it is there)."""
    if source.kind == "dummy":
        assert source.shape_name is not None
        return ModelInfo(source, NAMED_SHAPES[source.shape_name], None), None
    assert source.path is not None
    if source.kind == "gguf":
        from engine.loader import converted
        from engine.loader.gguf_file import GGUFFile, gguf_metadata, model_config_from_gguf

        gguf = GGUFFile(source.path)
        stored = converted.read_metadata(source.path) if use_cache else None
        if stored is None:
            meta, names = gguf_metadata(gguf.reader), {t.name for t in gguf.reader.tensors}
            if use_cache:
                converted.write_metadata(source.path, meta, names)
        else:
            meta, names = stored
        config = model_config_from_gguf(meta, names)
        return ModelInfo(source, config, Tokenizer.from_gguf_metadata(meta)), gguf
    from engine.loader.hf_dir import read_hf_config, read_hf_fp8_scheme

    config = read_hf_config(source.path)
    tokenizer = Tokenizer.from_hf_dir(source.path)
    return ModelInfo(source, config, tokenizer, read_hf_fp8_scheme(source.path)), None


def load_weights(
    info: ModelInfo, handle: Any, dtype: torch.dtype, seed: int = 0, device: Any = "cpu"
) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors in `dtype`: dummy weights are made on `device`, checkpoint
    weights are read to the CPU (the model copies them over). An FP8 checkpoint's fp8 weights
    stay fp8 and its scales (`*_scale`) fp32."""
    import torch

    if info.source.kind == "dummy":
        from engine.loader.dummy import dummy_weights

        return dummy_weights(info.config, dtype, seed, device)
    if info.source.kind == "gguf":
        from engine.loader.gguf_file import gguf_tensors

        arrays = gguf_tensors(handle.reader, info.config)
        return {
            name: torch.from_numpy(a.copy() if not a.flags.writeable else a).to(dtype)
            for name, a in arrays.items()
        }
    from engine.loader.hf_dir import hf_tensors

    assert info.source.path is not None
    return {
        name: _checkpoint_tensor(name, t, dtype) for name, t in hf_tensors(info.source.path).items()
    }


def _checkpoint_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import torch

    if tensor.dtype == torch.float8_e4m3fn:
        return tensor
    return tensor.float() if name.endswith("_scale") else tensor.to(dtype)


__all__ = [
    "ModelInfo",
    "ModelLoadError",
    "ModelSource",
    "describe_model",
    "load_weights",
    "resolve_model",
]
