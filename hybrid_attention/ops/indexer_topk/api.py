"""indexer_topk(q, weights, keys, k, visible): the lightning indexer's scores and top-k in one op."""

from __future__ import annotations

import torch

from ...checks import check_int, check_same_device, check_tensor
from ..dispatch import resolve_backend
from .common import FP4_BLOCK, FP4Keys
from .cpu import indexer_topk_cpu
from .reference import indexer_topk_reference


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor | FP4Keys, k: int,
                 visible: torch.Tensor | None = None, backend: str = "auto",
                 query_block: int | None = None) -> torch.Tensor:
    """Entry ids [b, s, k] int32 of the k best-scoring entries each query may see (SPEC 6, 12).

    q [b, s, hi, di] and weights [b, s, hi] (bf16 or fp32, same dtype), keys [b, t, di] in q.dtype
    or an `FP4Keys` (decoded as they are read). Score: I[t, i] = sum_h w[t, h] relu(q[t, h] . K[i])
    with the per-head products rounded to q.dtype. visible: how many leading entries each query may
    see, [s] or [b, s] int (None: all t; values past t mean t). For a causal prefill over
    compressed entries that is `(positions + 1) // ratio`.

    The ids come in ascending order; ties go to the lower id, so the set depends only on the scores.
    When a query sees fewer than k entries, its list ends in -1s. Callers add their row offset.

    backend: "torch" (blocks of `query_block` queries against the entries they can see; on a CPU
    the scores' GEMM runs in int8 where that is exact, see cpu.py), "triton"
    (fused scoring and a running top-k per query block; the score matrix never reaches global
    memory), or "auto" (Triton for CUDA tensors, else torch). Not differentiable: the selection is
    discrete, and the indexer trains through its own loss on gathered scores.
    """
    validate = not torch.compiler.is_compiling()
    if validate:
        _validate(q, weights, keys, k, visible, query_block)
    b, s = q.shape[:2]
    n_keys = keys.shape[1]
    if visible is None:
        visible = torch.full((b, s), n_keys, dtype=torch.int32, device=q.device)
    else:
        visible = visible.expand(b, s).clamp_max(n_keys).to(torch.int32)
    backend = resolve_backend(backend, q)
    with torch.no_grad():
        if backend == "triton":
            from .triton import indexer_topk_triton

            return indexer_topk_triton(q, weights, keys, k, visible)
        if not q.is_cuda:
            return indexer_topk_cpu(q, weights, keys, k, visible, query_block)
        return indexer_topk_reference(q, weights, keys, k, visible, query_block)


def _validate(q, weights, keys, k, visible, query_block) -> None:
    check_tensor("q", q)
    check_tensor("weights", weights)
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, seq, index_heads, index_head_dim], got shape {tuple(q.shape)}")
    b, s, hi, di = q.shape
    if not q.is_floating_point():
        raise ValueError(f"q must be a float tensor, got {q.dtype}")
    if weights.shape != (b, s, hi) or weights.dtype != q.dtype:
        raise ValueError(f"weights must be [{b}, {s}, {hi}] in {q.dtype}, got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    if isinstance(keys, FP4Keys):
        packed, exponents = keys.packed, keys.exponents
        check_tensor("FP4Keys.packed", packed)
        check_tensor("FP4Keys.exponents", exponents)
        if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.size(0) != b \
                or 2 * packed.size(-1) != di:
            raise ValueError(f"FP4Keys.packed must be uint8 [{b}, t, {di // 2}], got {packed.dtype} "
                             f"{tuple(packed.shape)}")
        if di % FP4_BLOCK or exponents.dtype != torch.int8 \
                or tuple(exponents.shape) != (b, packed.size(1), di // FP4_BLOCK):
            raise ValueError(f"FP4Keys.exponents must be int8 [{b}, {packed.size(1)}, {di // FP4_BLOCK}] "
                             f"(one per {FP4_BLOCK} values), got {exponents.dtype} {tuple(exponents.shape)}")
        check_same_device(q=q, weights=weights, **{"FP4Keys.packed": packed, "FP4Keys.exponents": exponents})
    elif not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys must be a torch.Tensor or an FP4Keys, got {type(keys).__name__}")
    elif keys.dim() != 3 or keys.size(0) != b or keys.size(2) != di or keys.dtype != q.dtype:
        raise ValueError(f"keys must be [{b}, t, {di}] in {q.dtype} or FP4Keys, got {keys.dtype} "
                         f"{tuple(keys.shape)}")
    else:
        check_same_device(q=q, weights=weights, keys=keys)
    # k = 0 is allowed (lists of width 0): the layer asks for min(index_topk, visible entries).
    check_int("k", k, 0)
    if query_block is not None:
        check_int("query_block", query_block, 1)
    if visible is not None:
        check_tensor("visible", visible)
        if visible.dtype not in (torch.int32, torch.int64) or visible.shape not in ((s,), (b, s)):
            raise ValueError(f"visible must be int [{s}] or [{b}, {s}], got {visible.dtype} "
                             f"{tuple(visible.shape)}")
        check_same_device(q=q, visible=visible)
        if not visible.is_cuda and visible.numel() and visible.min() < 0:  # no device sync on CUDA
            raise ValueError(f"visible counts must be >= 0, got {int(visible.min())}")
