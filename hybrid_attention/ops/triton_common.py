"""Triton helpers every kernel shares: dots and roundings that behave the same compiled and under
the interpreter, and in-kernel decoding of the FP8 / FP4 storage formats of `quant.py`.

Triton's interpreter (TRITON_INTERPRET=1, how the tests run the kernels on CPU) multiplies bf16 dot
operands as raw 16-bit integers and truncates fp32 -> bf16 casts. Under it, `mma` runs the dot on
fp32 operands (the same products: bf16 x bf16 is exact in fp32, and the accumulation is fp32 in both
cases) and `convert` rounds to nearest even by hand. Compiled kernels use native bf16 dots and casts.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def next_power_of_2(n: int, at_least: int = 16) -> int:
    """Block sizes are powers of two, and tl.dot wants at least 16 along every dim."""
    return max(at_least, triton.next_power_of_2(max(1, n)))


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), returned as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def convert(x, DTYPE: tl.constexpr):
    """x.to(DTYPE) with round-to-nearest-even, also under the interpreter."""
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            x = round_bf16(x.to(tl.float32))
    return x.to(DTYPE)


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation; IEEE=True keeps fp32 operands out of TF32."""
    if INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def pow2(exponent):
    """2 ** exponent as an exact fp32, exponent int32 in the normal range (ue8m0 scales)."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def decode_e4m3(byte):
    """FP8 e4m3 bit patterns (uint8) -> fp32 values (the quantiser never writes the NaN code)."""
    bits = byte.to(tl.int32)
    exponent = (bits >> 3) & 15
    mantissa = bits & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent > 0, normal, mantissa.to(tl.float32) * 0.001953125)  # 2^-9
    return tl.where((bits & 128) != 0, -magnitude, magnitude)


@triton.jit
def decode_e2m1(code):
    """FP4 e2m1 codes (int32, sign in bit 3) -> fp32 values of {0, 0.5, 1, 1.5, 2, 3, 4, 6}."""
    exponent = (code >> 1) & 3
    mantissa = code & 1
    bits = tl.where(exponent > 0, ((exponent + 126) << 23) | (mantissa << 22), mantissa * 0x3F000000)
    magnitude = bits.to(tl.float32, bitcast=True)
    return tl.where((code & 8) != 0, -magnitude, magnitude)
