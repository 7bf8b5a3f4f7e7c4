"""Kernel tests run on the GPU when there is one, else under Triton's CPU interpreter.

`@triton.jit` picks the interpreter when a kernel module is imported, so TRITON_INTERPRET=1 is
set here, before pytest imports any test module of this folder (and through it the kernels).
An explicit TRITON_INTERPRET in the environment wins.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into a Python int with `int(array)`, and
    its scalars are 1-element 1-d arrays, which numpy >= 2.4 refuses: every `range()` with a
    run-time bound fails with "only 0-dimensional arrays can be converted to Python scalars"
    (triton-lang/triton#9171, fixed upstream by #9172 after 3.6). Re-set `__index__` the way
    the upstream fix does, right after the interpreter patches it for each launch. Compiled
    kernels on a GPU are untouched."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "is_tandem_fix", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:  # (triton internals, untyped)
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.is_tandem_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_scalar_index()
