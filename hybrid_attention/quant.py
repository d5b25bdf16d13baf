"""FP8 e4m3 / FP4 e2m1 quantisation with power-of-two (ue8m0) block scales, and the Hadamard rotation.

`fake_quant_fp8` / `fake_quant_fp4` round to the grids exactly as DeepSeek's GPU kernels do
(SPEC.md section 8); `quantize_*` / `dequantize_*` produce and read the real low-precision bytes, and
dequantize(quantize(x)) == fake_quant(x) bit for bit.
"""

from __future__ import annotations

import functools
import math

import torch

from .checks import check_int, check_tensor

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_MIN_AMAX = 1e-4
FP4_MIN_AMAX = 6.0 * 2.0**-126
# The e2m1 magnitudes by code 0..7; the boundaries between neighbours and whether a value exactly
# on a boundary rounds up (ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
# 3.5->4, 5->4).
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def ceil_pow2_exponent(v: torch.Tensor) -> torch.Tensor:
    """ceil(log2(v)) for positive normal fp32 v, read from the bits (a float log2 can be off by one)."""
    bits = v.to(torch.float32).contiguous().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127
    return exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2**exponent as exact fp32 (exponent in the normal range)."""
    return ((exponent + 127).to(torch.int32) << 23).view(torch.float32)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    check_tensor("x", x)
    check_int("block", block, 1)
    if x.dim() == 0 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor with a last dim, got {x.dtype} {tuple(x.shape)}")
    if x.size(-1) % block:
        raise ValueError(f"last dim {x.size(-1)} is not a multiple of the block size {block}")
    return x.float().unflatten(-1, (-1, block))


def fp8_scale_exponents(x: torch.Tensor, block: int) -> torch.Tensor:
    amax = _blocks(x, block).abs().amax(-1).clamp_min(FP8_MIN_AMAX)
    return ceil_pow2_exponent(amax * (1.0 / FP8_MAX))


def fp4_scale_exponents(x: torch.Tensor, block: int) -> torch.Tensor:
    amax = _blocks(x, block).abs().amax(-1).clamp_min(FP4_MIN_AMAX)
    return ceil_pow2_exponent(amax / FP4_MAX)


def quantize_fp8(x: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (e4m3 values [..., n], int8 scale exponents [..., n/block])."""
    exponents = fp8_scale_exponents(x, block)
    scaled = _blocks(x, block) / pow2(exponents)[..., None]
    values = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2)
    return values, exponents.to(torch.int8)


def _check_scales(name: str, values: torch.Tensor, exponents: torch.Tensor, per_byte: int) -> None:
    """exponents [..., m] beside values [..., n] (`per_byte` codes a byte): m >= 1 dividing n * per_byte."""
    check_tensor(name, values)
    check_tensor("exponents", exponents)
    width = values.size(-1) * per_byte if values.dim() else 0
    if values.dim() == 0 or exponents.shape[:-1] != values.shape[:-1] or exponents.size(-1) < 1 \
            or width % exponents.size(-1):
        raise ValueError(f"exponents must be [..., m] beside {name} {tuple(values.shape)}, one per block of "
                         f"{width} // m values, got shape {tuple(exponents.shape)}")


def dequantize_fp8(values: torch.Tensor, exponents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_scales("values", values, exponents, 1)
    block = values.size(-1) // exponents.size(-1)
    scaled = values.float().unflatten(-1, (-1, block)) * pow2(exponents.to(torch.int32))[..., None]
    return scaled.flatten(-2).to(dtype)


def fake_quant_fp8(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """FakeQ8 (SPEC 8): round to e4m3 with a ue8m0 scale per `block` values; result in x.dtype."""
    return dequantize_fp8(*quantize_fp8(x, block), dtype=x.dtype)


def fp4_codes(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (sign in bit 3) of v already clamped to [-6, 6], ties to the even code."""
    magnitude = v.abs()
    code = torch.zeros_like(magnitude, dtype=torch.uint8)
    for k, boundary in enumerate(_FP4_BOUNDARIES):
        # Between code k and k+1 a tie goes to the even one: up when k+1 is even (k odd).
        above = magnitude >= boundary if k % 2 else magnitude > boundary
        code += above.to(torch.uint8)
    return code | ((v < 0).to(torch.uint8) << 3)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    grid = torch.tensor(FP4_GRID, dtype=torch.float32, device=codes.device)
    magnitude = grid[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def quantize_fp4(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (uint8 with two e2m1 codes per byte, low nibble first [..., n/2], int8 exponents)."""
    exponents = fp4_scale_exponents(x, block)
    scaled = (_blocks(x, block) / pow2(exponents)[..., None]).clamp(-FP4_MAX, FP4_MAX).flatten(-2)
    codes = fp4_codes(scaled)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, exponents.to(torch.int8)


def dequantize_fp4(packed: torch.Tensor, exponents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_scales("packed", packed, exponents, 2)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    block = codes.size(-1) // exponents.size(-1)
    values = fp4_values(codes).unflatten(-1, (-1, block)) * pow2(exponents.to(torch.int32))[..., None]
    return values.flatten(-2).to(dtype)


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FakeQ4 (SPEC 8): round to e2m1 with a ue8m0 scale per `block` values; result in x.dtype."""
    return dequantize_fp4(*quantize_fp4(x, block), dtype=x.dtype)


def fake_quant_nope_fp8(kv: torch.Tensor, rope_dim: int, block: int = 64) -> torch.Tensor:
    """FakeQ8 on the non-rope dims of a KV entry; the rope dims stay as they are (SPEC 3.3)."""
    check_tensor("kv", kv)
    check_int("rope_dim", rope_dim, 0)
    if kv.dim() == 0 or rope_dim > kv.size(-1):
        raise ValueError(f"rope_dim={rope_dim} exceeds the width of kv {tuple(kv.shape)}")
    nope = kv.size(-1) - rope_dim
    return torch.cat((fake_quant_fp8(kv[..., :nope], block), kv[..., nope:]), dim=-1)


@functools.lru_cache(maxsize=8)
def hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester-ordered +-1 Walsh-Hadamard matrix H[i, j] = (-1)^popcount(i & j), fp32."""
    check_int("n", n, 1)
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.size(0) < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """(x @ H_n) / sqrt(n) over the last dim, in fp32, rounded once to x.dtype (SPEC 6)."""
    check_tensor("x", x)
    if x.dim() == 0 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor with a last dim, got {x.dtype} {tuple(x.shape)}")
    n = x.size(-1)
    h = hadamard_matrix(n).to(x.device)
    return ((x.float() @ h) * (1.0 / math.sqrt(n))).to(x.dtype)


def dequantize_fp8_weight(weight: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """W[o, i] * scale[o // block, i // block] in fp32 (checkpoint FP8 weights, ue8m0 scales)."""
    check_tensor("weight", weight)
    check_tensor("scale", scale)
    check_int("block", block, 1)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    expected = (math.ceil(out_features / block), math.ceil(in_features / block))
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {expected} for a "
                         f"{tuple(weight.shape)} weight with {block}x{block} blocks")
    s = scale.float().repeat_interleave(block, 0)[:out_features].repeat_interleave(block, 1)
    return weight.float() * s[:, :in_features]
