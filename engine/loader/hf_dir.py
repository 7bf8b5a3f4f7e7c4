"""Loading Llama-family models from a Hugging Face directory.

`config.json` for the shape, `*.safetensors` for the weights, `tokenizer.json` and
`tokenizer_config.json` for the tokenizer and chat template. Never touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from contracts.errors import ModelLoadError, UnsupportedModel
from engine.loader.hf_quant import Fp8CheckpointScheme, fp8_scheme_from_hf_config
from engine.model_config import ModelConfig, model_config_from_hf

# float8_e4m3fn: the weights of FP8 checkpoints (see hf_quant), kept as stored.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)


def read_hf_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory} has no config.json")
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    return model_config_from_hf(raw)


def read_hf_fp8_scheme(directory: Path) -> Fp8CheckpointScheme | None:
    """The checkpoint's FP8 quantization scheme (None: unquantized); UnsupportedModel for any
    other quantization format."""
    raw: dict[str, Any] = json.loads((directory / "config.json").read_text())
    return fp8_scheme_from_hf_config(raw)


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the directory's safetensors files, in their stored dtype."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if tensor.dtype not in SUPPORTED_DTYPES:
                raise UnsupportedModel(f"tensor {name} in {file.name} has dtype {tensor.dtype}")
            weights[name] = tensor
    return weights
