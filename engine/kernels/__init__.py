"""Triton kernels for the engine's GPU path, one op per module.

Each module holds the `@triton.jit` kernel, a launcher that checks device, dtype, shapes and
strides, and `<op>_ref` in plain torch, kept forever as the reference the kernel is tested
against. Importing this package does not import triton; each op module does.
"""
