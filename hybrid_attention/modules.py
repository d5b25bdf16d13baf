"""Small building blocks shared by the layer, the compressor and the indexer."""

from __future__ import annotations

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
