"""Small building blocks shared by the layer, the compressor and the indexer."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from .checks import check_bool, check_int, check_positive_finite
from .quant import fake_quant_fp8


class RMSNorm(nn.Module):
    """y = w * x * rsqrt(mean(x^2) + eps), computed in fp32, returned in x.dtype (SPEC 3.1)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int("dim", dim, 1)
        check_positive_finite("eps", eps)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


class Linear(nn.Linear):
    """A bias-free linear layer; optionally rounds its input to FP8 (block 128) as the FP8 model does."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None,
                 fp8_inputs: bool = False) -> None:
        check_int("in_features", in_features, 1)
        check_int("out_features", out_features, 1)
        check_bool("fp8_inputs", fp8_inputs)
        super().__init__(in_features, out_features, bias=False, dtype=dtype)
        self.fp8_inputs = fp8_inputs and in_features % 128 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_inputs:
            x = fake_quant_fp8(x, block=128)
        return linear(x, self.weight.to(x.dtype))


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_HAS_ONEDNN_LINEAR = _has_onednn_linear()
# Multiply-adds from which a call goes to oneDNN: below this its fixed cost (30-40 us a call on
# the Zen 4 guests of benchmarks/RESULTS.md) outweighs the faster GEMM (`bench_linear.py`).
ONEDNN_MIN_MACS = 1 << 23


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [.., in] @ weight [out, in]^T, no bias: `nn.functional.linear`, except for fp32 inference
    on the CPU with at least ONEDNN_MIN_MACS multiply-adds (a prefill chunk, not a decode step),
    which runs on oneDNN's GEMM. Same fp32 arithmetic; the order of the additions, so the last
    bits, differ. On the Zen 4 guests of benchmarks/RESULTS.md it takes 0.6-0.85 of the time of
    the default BLAS for the layer's projections over 32K rows. Anything that autograd tracks,
    other dtypes and devices, and `torch.backends.mkldnn.enabled = False` take
    `nn.functional.linear`."""
    if (_HAS_ONEDNN_LINEAR and x.numel() * weight.size(0) >= ONEDNN_MIN_MACS
            and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return nn.functional.linear(x, weight)


def head_rms_normalize(q: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head q * rsqrt(mean(q^2) + eps) with no weight, every op in q.dtype (SPEC 3.2)."""
    return q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)


# Tokens per piece of `recompute_rows`: 8 MB per [piece, 1024] fp32 temporary.
RECOMPUTE_ROWS = 2048


def recompute_rows(function, rows: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                   params: list[nn.Parameter]) -> torch.Tensor:
    """function(rows, positions, freqs) computed RECOMPUTE_ROWS tokens (axis 1) at a time, keeping
    for backward only its inputs: backward runs each piece again and differentiates it there.

    For the token-wise paths between a GEMM and the attention op (the query path's RMS and RoPE,
    the de-rotation and grouped output projection): with autograd's own bookkeeping, their
    [s, h * d] intermediates and the gradients of each would all be alive in backward; here at
    most one piece's are. `params` are the parameters `function` uses (their gradients are summed
    over the pieces). The pieces are written into one output, so nothing is held twice."""
    if not (torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in params))):
        return function(rows, positions, freqs)
    return _RecomputedRows.apply(function, rows, positions, freqs, *params)


class _RecomputedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, rows, positions, freqs, *params):
        ctx.function = function
        ctx.autocast = [(device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                        for device in ("cpu", "cuda")]
        ctx.save_for_backward(rows, positions, freqs, *params)
        out = None
        for a in range(0, rows.size(1), RECOMPUTE_ROWS):
            e = min(rows.size(1), a + RECOMPUTE_ROWS)
            piece = function(rows[:, a:e], positions[a:e], freqs)
            if out is None:
                out = piece.new_empty(rows.size(0), rows.size(1), *piece.shape[2:])
            out[:, a:e] = piece
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, positions, freqs, *params = ctx.saved_tensors
        wanted = [p for p in params if p.requires_grad]
        d_rows = torch.empty_like(rows) if ctx.needs_input_grad[1] else None
        d_params = [torch.zeros_like(p) for p in wanted]
        for a in range(0, rows.size(1), RECOMPUTE_ROWS):
            e = min(rows.size(1), a + RECOMPUTE_ROWS)
            piece = rows[:, a:e].detach().requires_grad_(d_rows is not None)
            with torch.enable_grad(), ExitStack() as stack:
                for device, enabled, dtype in ctx.autocast:  # the autocast state of the forward
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
                out = ctx.function(piece, positions[a:e], freqs)
            inputs = ([piece] if d_rows is not None else []) + wanted
            grads = torch.autograd.grad(out, inputs, grad[:, a:e], allow_unused=True)
            if d_rows is not None:
                d_rows[:, a:e] = grads[0]
                grads = grads[1:]
            for total, g in zip(d_params, grads, strict=True):
                if g is not None:
                    total += g
        it = iter(d_params)
        return (None, d_rows, None, None, *(next(it) if p.requires_grad else None for p in params))

