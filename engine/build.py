"""The parts of an Engine made from its config: device and dtype, the model (loaded,
quantized, sharded), the scheduler's limits, and how many KV blocks and tokens of context fit.

Pure functions of their arguments (and the device's free memory); `engine.engine.Engine`
calls them once, in order, when it starts.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

import torch

from contracts.errors import ModelLoadError
from engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig, default_scheduler_config
from engine.fp8_gptq import use_gptq_fp8_linears
from engine.kv_calibration import calibration_ids
from engine.kv_quant import KV_FP8_DTYPE, fp8_row_bytes
from engine.llama import LlamaModel
from engine.loader import converted, load_weights
from engine.model_config import ModelConfig
from engine.parallel import TensorParallelGroup
from engine.quantization import use_fp8_linears
from engine.scheduler import SchedulerConfig
from engine.sharding import ShardLayout, shard_weights

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def build_model(
    config: EngineConfig,
    info: Any,
    handle: object,
    backend: Any,
    device: torch.device,
    dtype: torch.dtype,
    shard: ShardLayout | None = None,
    tp: TensorParallelGroup | None = None,
) -> LlamaModel:
    """The model of `info` (engine.loader's description) on `device`: its weights loaded (from
    the converted cache when it can), FP8 linears if asked or in the checkpoint, this rank's
    shard under tensor parallelism."""
    shape = info.config if shard is None else shard.local_config(info.config)
    with torch.device("meta"):
        model = LlamaModel(shape, backend)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.float().init_tables()  # rotary tables stay fp32
    model.tie_embeddings()
    scheme = info.fp8_scheme
    gptq = config.fp8_weight_calibration == "gptq"
    if gptq and scheme is not None:
        raise ModelLoadError(
            f"fp8_weight_calibration='gptq' rounds a bf16/fp32 model's weights, but "
            f"{info.source.path}'s weights are FP8 already ({scheme.quant_method}); leave it "
            "unset"
        )
    # FP8 linears before loading; with GPTQ only after the unquantized model has calibrated
    loads_fp8 = (config.quantization == "fp8" and not gptq) or scheme is not None
    if loads_fp8:
        use_fp8_linears(model, static_input_scale=bool(scheme and scheme.static_activations))
    source = info.source
    # the converted cache holds whole models only
    cacheable = source.kind == "gguf" and config.converted_cache and not loads_fp8
    gguf = source.path if cacheable and shard is None else None
    if gguf is None or not converted.load_parameters(gguf, model):
        # consumed as it is copied in: the checkpoint and the model are never both whole
        weights = load_weights(info, handle, dtype, config.seed, device)
        model.load_weights(weights if shard is None else shard_weights(weights, shard))
        if gguf is not None:
            converted.store_parameters(gguf, model)
    if gptq:
        shape = info.config
        ids = calibration_ids(info.tokenizer, shape.vocab_size, shape.max_position_embeddings)
        use_gptq_fp8_linears(model, ids, device)
        if device.type == "cuda":  # the bf16 projections and GPTQ's work, back to the card
            gc.collect()  # before the KV cache is sized from the free memory
            torch.cuda.empty_cache()
    if shard is not None:
        assert tp is not None
        model.set_tensor_parallel(tp, shard)
    model.pack_for_cpu()
    return model.eval()


def scheduler_config(config: EngineConfig, device: torch.device) -> SchedulerConfig:
    """The config's scheduler limits, or the card's defaults; its target ITL, if set."""
    scheduler = config.scheduler
    if scheduler is None:
        total = 0
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        scheduler = default_scheduler_config(device.type, total)
    if config.target_itl_s is not None:
        scheduler = dataclasses.replace(scheduler, target_step_s=config.target_itl_s)
    return scheduler


def kv_bytes_per_token(
    model: ModelConfig, kv_dtype: torch.dtype, dtype: torch.dtype, fp8_scales: str = "per_head"
) -> int:
    """KV bytes one token takes in the cache of a model of shape `model` (this rank's); an FP8
    cache's rows carry a 4-byte scale each with per-token scales, none with per-head ones."""
    if kv_dtype == KV_FP8_DTYPE:
        row = fp8_row_bytes(model.head_dim, fp8_scales)
        return 2 * model.num_layers * model.num_kv_heads * row
    return model.kv_bytes_per_token(dtype.itemsize)


def kv_blocks_that_fit(
    config: EngineConfig, device: torch.device, bytes_per_token: int, reserved_bytes: int = 0
) -> int:
    """The config's block count, or as many blocks as its KV budget holds once
    `reserved_bytes` (a transfer staging region) are taken from it (the budget: the config's
    bytes, else a share of the device's free memory, or the CPU default). Raises ValueError
    if the reserved bytes leave no block."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    budget = config.kv_cache_bytes or _default_kv_cache_bytes(
        device, config.kv_cache_memory_fraction
    )
    fit = (budget - reserved_bytes) // (config.block_size * bytes_per_token)
    if reserved_bytes and fit < 1:
        raise ValueError(
            f"the KV budget of {budget} bytes holds no block once the transfer staging region "
            f"takes {reserved_bytes} (kv_staging_blocks, sized for max_model_len): lower "
            f"max_model_len or give the KV cache more memory"
        )
    return max(fit, 1)


def max_model_len(config: EngineConfig, model: ModelConfig, num_kv_blocks: int) -> int:
    """The model's context, capped by what the KV cache can hold for one sequence."""
    length = config.max_model_len or model.max_position_embeddings
    if length > model.max_position_embeddings:
        raise ValueError(
            f"max_model_len={length} exceeds the model's context {model.max_position_embeddings}"
        )
    return min(length, num_kv_blocks * config.block_size)


def _default_kv_cache_bytes(device: torch.device, memory_fraction: float) -> int:
    if device.type != "cuda":
        return DEFAULT_CPU_KV_CACHE_BYTES
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return int(free_bytes * memory_fraction)
