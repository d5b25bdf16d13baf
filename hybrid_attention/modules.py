"""Small building blocks shared by the layer, the compressor and the indexer."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from .checks import check_bool, check_int, check_positive_finite
from .quant import fake_quant_fp8
from .rope import rotate_


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
        return linear(self.gemm_input(x), self.weight.to(x.dtype))

    def gemm_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the GEMM multiplies by the weight: x, or x rounded to FP8 with fp8_inputs."""
        return fake_quant_fp8(x, block=128) if self.fp8_inputs else x


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


def normalize_and_rotate(q: torch.Tensor, eps: float, positions: torch.Tensor, freqs: torch.Tensor
                         ) -> torch.Tensor:
    """The queries' last steps (SPEC 3.2): the per-head RMS normalisation with no weight,
    y = q * rsqrt(mean(q^2) + eps) (every op in q.dtype), then RoPE on y's last dims (`rotate`),
    as one op: the rotation done in place on the normalised copy, and a backward of its own
    that keeps only the output and the [.., 1] scale (not autograd's chain of copies):
        with y = q * r and out = R y (R the rotation, orthogonal per pair):
        mean(dy * y) = mean(dout * out), so dq = r * R^-1 (dout - out * mean(dout * out))."""
    if torch.is_grad_enabled() and q.requires_grad:
        return _NormalizeAndRotate.apply(q, eps, positions, freqs)
    return rotate_(_normalized(q, eps)[0], positions, freqs)


class _NormalizeAndRotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, eps, positions, freqs):
        y, r = _normalized(q, eps)
        out = rotate_(y, positions, freqs)
        ctx.save_for_backward(out, r)
        ctx.positions, ctx.freqs = positions, freqs
        return out

    @staticmethod
    def backward(ctx, grad):
        out, r = ctx.saved_tensors
        m = (grad * out).mean(-1, keepdim=True)
        dq = torch.addcmul(grad, out, m, value=-1).contiguous()  # rotate_ needs a contiguous last dim
        dq = rotate_(dq, ctx.positions, ctx.freqs, inverse=True)
        return dq.mul_(r), None, None, None


def _normalized(q: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r): y = q * r, r = rsqrt(mean(q^2) + eps) [..., 1]."""
    r = torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)
    return q * r, r


# Tokens per piece of `recompute_pieces`: 8 MB per [piece, 1024] fp32 temporary.
RECOMPUTE_ROWS = 2048


def recompute_pieces(function, rows: list[torch.Tensor | None], shared: list, params: list[nn.Parameter],
                     piece: int | None = None, project: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """function(a, e, rows_piece, shared) over pieces [a, e) of `piece` tokens (axis 1 of `rows`),
    keeping for backward only its inputs: backward runs each piece again and differentiates it
    there (activation checkpointing, one piece at a time).

    function returns (out [b, e - a, ...], sums): the piece's rows of the output, and a 1-D tensor
    of quantities that add up over pieces (a loss summed over its queries, a count), or None.
    rows: tensors [b, s, ...] cut into pieces (None stays None); shared: what every piece reads
    whole (tensors get gradients summed over pieces; anything else is passed as is); params: the
    parameters `function` uses (their gradients are summed over the pieces).

    For the query side of a layer (projections, attention, output projection): with autograd's own
    bookkeeping every [s, heads * head_dim] intermediate and the gradients of each would be alive
    in backward; here at most one piece's are. The forward's autocast state is replayed in backward.

    project: a weight [out, in] applied last, out = linear(function's out, project), as the piece's
    final linear layer (not among params). Backward's rerun stops before it: its gradients need the
    output's gradient and its input, not its output, so that GEMM runs once instead of twice.
    Returns (out [b, s, ...], the sums over pieces)."""
    piece = piece or RECOMPUTE_ROWS
    tensors = [t for t in (*rows, *shared, project) if isinstance(t, torch.Tensor)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, *params))):
        return _run_pieces(function, rows, shared, piece, project)
    extra = () if project is None else (project,)
    return _RecomputedPieces.apply(function, piece, len(rows), len(shared), project is not None,
                                   *rows, *shared, *params, *extra)


def _projected(y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """y @ weight^T as `Linear` computes it (the weight in y's dtype), or y without a weight."""
    return y if weight is None else linear(y, weight.to(y.dtype))


def _run_pieces(function, rows, shared, piece, project=None):
    s = next(t.size(1) for t in rows if t is not None)
    out = sums = None
    for a in range(0, s, piece):
        e = min(s, a + piece)
        y, extra = function(a, e, [None if t is None else t[:, a:e] for t in rows], shared)
        y = _projected(y, project)
        if out is None:
            out = y.new_empty(y.size(0), s, *y.shape[2:])
        out[:, a:e] = y
        if extra is not None:
            sums = extra if sums is None else sums + extra
    return out, sums if sums is not None else out.new_zeros(0, dtype=torch.float32)


class _RecomputedPieces(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, piece, n_rows, n_shared, has_project, *inputs):
        ctx.function, ctx.piece, ctx.n_rows, ctx.n_shared = function, piece, n_rows, n_shared
        ctx.has_project = has_project
        ctx.autocast = [(device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                        for device in ("cpu", "cuda")]
        # Tensors go through save_for_backward (autograd checks they are not modified in place);
        # the rest of `shared` (None, a paged view) is kept on ctx.
        ctx.kinds = [isinstance(t, torch.Tensor) for t in inputs]
        ctx.others = [t for t in inputs if not isinstance(t, torch.Tensor)]
        ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))
        rows, shared = list(inputs[:n_rows]), list(inputs[n_rows:n_rows + n_shared])
        return _run_pieces(function, rows, shared, piece, inputs[-1] if has_project else None)

    @staticmethod
    def backward(ctx, grad_out, grad_sums):
        saved, others = iter(ctx.saved_tensors), iter(ctx.others)
        inputs = [next(saved) if kind else next(others) for kind in ctx.kinds]
        n_rows, n_shared = ctx.n_rows, ctx.n_shared
        rows, shared = inputs[:n_rows], inputs[n_rows:n_rows + n_shared]
        project = inputs[-1] if ctx.has_project else None
        params = inputs[n_rows + n_shared:len(inputs) - ctx.has_project]
        wanted = [i for i, t in enumerate(inputs)  # 5: function, piece, n_rows, n_shared, has_project
                  if isinstance(t, torch.Tensor) and ctx.needs_input_grad[5 + i]]
        grads = [None] * len(inputs)
        for i in wanted:
            grads[i] = torch.zeros_like(inputs[i])
        want_project = ctx.has_project and len(inputs) - 1 in wanted
        through = [i for i in wanted if not (want_project and i == len(inputs) - 1)]  # the rerun's
        # The shared tensors as leaves of every piece's graph, the parameters as themselves.
        leaves = list(shared)
        for j, t in enumerate(shared):
            if n_rows + j in wanted:
                leaves[j] = t.detach().requires_grad_()
        s = next(t.size(1) for t in rows if t is not None)
        for a in range(0, s, ctx.piece):
            e = min(s, a + ctx.piece)
            pieces = [None if t is None else t[:, a:e].detach().requires_grad_(i in wanted)
                      for i, t in enumerate(rows)]
            grad_y = grad_out[:, a:e]
            with torch.enable_grad(), ExitStack() as stack:
                for device, enabled, dtype in ctx.autocast:  # the autocast state of the forward
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
                y, extra = ctx.function(a, e, pieces, leaves)
                if project is not None:  # the projection's backward, by hand (its input is y)
                    grad_y, dweight = _linear_backward(y, project, grad_y, want_project)
                    if dweight is not None:
                        grads[-1] += dweight
            # Either output may lack a graph (only the indexer trains: y has none).
            outputs = [(t, g) for t, g in ((y, grad_y), (extra, grad_sums))
                       if t is not None and t.requires_grad]
            if not outputs or not through:
                continue
            sources = [pieces[i] if i < n_rows else leaves[i - n_rows] if i < n_rows + n_shared else
                       params[i - n_rows - n_shared] for i in through]
            found = torch.autograd.grad([t for t, _ in outputs], sources, [g for _, g in outputs],
                                        allow_unused=True)
            for i, g in zip(through, found, strict=True):
                if g is not None and i < n_rows:
                    grads[i][:, a:e] = g
                elif g is not None:
                    grads[i] += g
        return (None, None, None, None, None, *grads)


def _linear_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, want_weight: bool):
    """The gradients of `_projected(x, weight)` for the output's gradient `grad`, in the dtype its
    GEMM ran in (autocast's, where autocast is on): (dx, dweight or None). No grad mode needed."""
    with torch.no_grad():
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        w = weight.to(x.dtype).to(dtype)
        g = grad.to(dtype)
        dx = (g @ w).to(x.dtype)
        dweight = None
        if want_weight:
            dweight = (g.flatten(0, -2).transpose(0, 1) @ x.to(dtype).flatten(0, -2)).to(weight.dtype)
    return dx, dweight
