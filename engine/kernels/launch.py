"""Checks and context shared by the kernel launchers: one device for all inputs, and launching
on that device."""

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
