"""Checks and context shared by the kernel launchers: every input on one device, that device a GPU
(or Triton's CPU interpreter on, TRITON_INTERPRET=1), and launching on the inputs' GPU rather
than whichever device is current.
"""

from __future__ import annotations

import contextlib

import torch
import triton


def check_devices(*tensors: torch.Tensor) -> None:
    """All tensors on one device, and that device a GPU (or Triton's CPU interpreter is on)."""
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        devices = [str(t.device) for t in tensors]
        raise ValueError(f"all inputs must be on one device, got {devices}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"inputs must be on a CUDA device (or TRITON_INTERPRET=1), got {device}")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the inputs' GPU, not whatever device is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def given_scales(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Whether FP8 scale views are per-head scales broadcast over blocks and slots (strides 0
    there; engine.kv_quant.layer_fp8_views): one scale per head, which the KV write reads and
    the attention kernels fold into the scores and the output, rather than one per row."""
    return all(s is not None and s.stride()[:2] == (0, 0) for s in (k_scale, v_scale))


def check_kv_scales(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> bool:
    """Whether the cache is e4m3 (engine.kv_quant). ValueError unless scales come exactly with
    an e4m3 cache, as fp32 [num_blocks, block_size, num_kv_heads] on the cache's device."""
    is_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if (k_scale is not None) != is_fp8 or (v_scale is not None) != is_fp8:
        raise ValueError(
            f"k_scale and v_scale are required with an e4m3 cache and only then "
            f"(cache {k_cache.dtype}, scales given: {k_scale is not None}, {v_scale is not None})"
        )
    if k_scale is None or v_scale is None:
        return False
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        # the kernels load e4m3 rows 4 bytes at a time (engine.kv_quant's packed rows are
        # head_dim + 4 bytes, head_dim % 4 == 0)
        if t.data_ptr() % 4 or any(s % 4 for s in t.stride()[:-1]):
            raise ValueError(
                f"an e4m3 {name} must have 4-byte aligned rows, got strides {t.stride()} "
                f"at address {t.data_ptr():#x}"
            )
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t.shape != k_cache.shape[:3] or t.dtype != torch.float32:
            raise ValueError(
                f"{name} must be fp32 {tuple(k_cache.shape[:3])}, got {t.dtype} {tuple(t.shape)}"
            )
    check_devices(k_cache, v_cache, k_scale, v_scale)
    return True


def only_4_byte_aligned(*caches: torch.Tensor) -> bool:
    """Whether some e4m3 cache's rows are 4- but not 16-byte aligned (head_dim % 16 != 0):
    the kernels then say so to Triton (its own specialization covers 16-byte alignment)."""
    return any(t.data_ptr() % 16 or any(s % 16 for s in t.stride()[:-1]) for t in caches)


def check_amax_out(amax: torch.Tensor, rows: int, parts: int, device: torch.device) -> None:
    """A buffer for partial amaxes (engine.quantization.Fp8Pending): contiguous fp32
    [rows, parts] on the inputs' device. ValueError naming what is wrong."""
    if amax.dtype != torch.float32 or tuple(amax.shape) != (rows, parts):
        raise ValueError(
            f"amax_out must be fp32 [{rows}, {parts}], got {amax.dtype} {tuple(amax.shape)}"
        )
    if not amax.is_contiguous() or amax.device != device:
        raise ValueError(
            f"amax_out must be contiguous on {device}, got strides {amax.stride()} on {amax.device}"
        )
