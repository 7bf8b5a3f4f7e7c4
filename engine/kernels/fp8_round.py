"""Rounding fp32 to the nearest e4m3fn value inside a Triton kernel, before the conversion.

Kernels that write FP8 (kv_write, fp8_quant) call `round_to_e4m3` on values already scaled
into [-448, 448], then convert: the conversion is then exact on every backend, so the GPU and
Triton's CPU interpreter give the same bytes as torch's `.to(torch.float8_e4m3fn)` (round to
nearest even, with subnormals). Triton 3.6's interpreter alone rounds ties away from zero,
flushes subnormals and, rounding up to a power of two, loses the carry (126 became 64).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(x):
    """fp32 x (|x| <= 448) rounded to the nearest e4m3fn value, ties to even, still in fp32,
    so the conversion that follows is exact on every backend. (Triton 3.6's CPU interpreter
    rounds ties away, flushes subnormals and loses the carry when rounding up to a power of
    two: 126 became 64. With this, kernel and torch reference agree bit for bit.)"""
    # Normal range: keep sign, exponent and 3 mantissa bits; round on the 20 dropped bits
    # (+0x7FFFF, +1 more if the kept lsb is odd: ties to even); a carry bumps the exponent.
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormal range (|x| < 2^-6): multiples of 2^-9, rounded to nearest even by adding and
    # removing 1.5 * 2^23.
    subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)
