"""Rotary position embedding with YaRN frequency scaling (SPEC.md section 2).

Interleaved pairs: pair k of the last `rope_dim` dims is (v[2k], v[2k+1]) read as a + ib.
Angles are a single fp32 multiply of the fp32 position by the fp32 frequency, so that rotations at
large positions match the reference bit for bit; no table, so there is no maximum position.
"""

from __future__ import annotations

import torch

from .checks import check_int, check_positive_finite, check_tensor
from .config import AttentionConfig, yarn_correction_range


def rope_frequencies(rope_dim: int, theta: float, factor: float = 1.0, original_seq_len: int = 0,
                     beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """fp32 frequencies [rope_dim/2]; YaRN-blended when original_seq_len > 0."""
    check_int("rope_dim", rope_dim, 2)
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even (pairs of dims rotate together), got {rope_dim}")
    check_positive_finite("theta", theta)
    check_int("original_seq_len", original_seq_len, 0)
    if original_seq_len > 0:
        if theta <= 1:  # the YaRN range divides by log(theta)
            raise ValueError(f"theta must be > 1 with YaRN (original_seq_len > 0), got {theta!r}")
        for name, value in (("factor", factor), ("beta_fast", beta_fast), ("beta_slow", beta_slow)):
            check_positive_finite(name, value)
    # As Python floats: an int field (a config may hold 2**64) cannot enter a torch op past int64.
    theta, factor = float(theta), float(factor)
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
    freqs = 1.0 / (theta ** exponents)  # a power, then a reciprocal, in fp32
    if original_seq_len > 0:
        lo, hi = yarn_correction_range(rope_dim, theta, original_seq_len, beta_fast, beta_slow)
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def layer_rope_frequencies(cfg: AttentionConfig, compressed: bool) -> torch.Tensor:
    """The one table a layer uses: compressed layers get YaRN on compress_rope_theta (SPEC 2)."""
    if compressed:
        return rope_frequencies(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.rope_factor,
                                cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow)
    return rope_frequencies(cfg.rope_head_dim, cfg.rope_theta)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    """Rotate the last `2 * len(freqs)` dims of x.

    x: [b, s, ..., d] with the tokens on axis 1 (any head axes between); positions [s] or [b, s].
    Math in fp32 (fp64 for fp64 x), result in x.dtype. `inverse` rotates by -angle (de-rotation).
    Differentiable in x: a rotation's gradient is the opposite rotation of the output's gradient,
    one op in backward (`_Rotate`) instead of autograd's chain of copies and complex views.
    """
    if not torch.compiler.is_compiling():
        _check_rope_args(x, positions, freqs)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotate.apply(x, positions, freqs, inverse)
    return rotate(x, positions, freqs, inverse)


def rotate(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool) -> torch.Tensor:
    """`apply_rope`'s arithmetic, unchecked and without autograd."""
    out = x.to(_math_dtype(x.dtype)).contiguous()
    if out.data_ptr() == x.data_ptr():
        out = out.clone()  # fp32 and contiguous already: do not rotate x in place
    return rotate_(out, positions, freqs, inverse).to(x.dtype)


def rotate_(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
            inverse: bool = False) -> torch.Tensor:
    """`rotate` in place on x (its last dimension contiguous), unchecked, without autograd: the
    math in fp32 (fp64 for fp64), the result rounded to x.dtype as `rotate` rounds it. Returns x."""
    rope_dim = 2 * freqs.numel()
    angles = positions.to(torch.float32)[..., None] * freqs.to(positions.device)  # [.., s, rd/2]
    extra = x.dim() - 3  # head axes between the token axis and the feature axis
    angles = angles.reshape(*angles.shape[:-1], *([1] * extra), angles.shape[-1])
    part = x[..., -rope_dim:]
    angles = angles.to(_math_dtype(x.dtype))  # fp32 angles (as the official code), fp64 cos for fp64
    cos, sin = angles.cos(), angles.sin()
    if inverse:
        sin = -sin
    # Pair k as a complex number times e^(i angle): (a cos - b sin) + i (a sin + b cos).
    exact = part if x.dtype == _math_dtype(x.dtype) else part.float()
    pairs = torch.view_as_complex(exact.unflatten(-1, (-1, 2)))
    pairs.mul_(torch.complex(cos, sin))
    if exact is not part:
        part.copy_(exact)
    return x


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, freqs, inverse):
        ctx.positions, ctx.freqs, ctx.inverse = positions, freqs, inverse
        return rotate(x, positions, freqs, inverse)

    @staticmethod
    def backward(ctx, grad):
        return rotate(grad, ctx.positions, ctx.freqs, not ctx.inverse), None, None, None


def _check_rope_args(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> None:
    for name, value in (("x", x), ("positions", positions), ("freqs", freqs)):
        check_tensor(name, value)
    if x.dim() < 3 or not x.is_floating_point():
        raise ValueError(f"x must be a float [b, s, ..., d] tensor, got {x.dtype} {tuple(x.shape)}")
    if freqs.dim() != 1 or 2 * freqs.numel() > x.size(-1):
        raise ValueError(f"freqs must be [rope_dim / 2] with rope_dim <= {x.size(-1)} (the width of x), "
                         f"got shape {tuple(freqs.shape)}")
    if positions.dim() not in (1, 2) or positions.size(-1) != x.size(1):
        raise ValueError(f"positions must be [{x.size(1)}] or [b, {x.size(1)}] (one per token of x), "
                         f"got shape {tuple(positions.shape)}")
