"""Readable torch reference of sparse attention with a sink (SPEC.md section 7): the oracle, and the
CPU production path.

For query (b, t), head h, valid rows V = {j : idx[b, t, j] != -1}:
    z_j  = scale * <q[b, t, h], kv[b, idx_j]>          fp32
    m    = max_j z_j                                    (the sink is not part of the max)
    o    = sum_j e^(z_j - m) kv[b, idx_j] / (sum_j e^(z_j - m) + e^(sink[h] - m))

Queries are processed in blocks so the [block, k, d] gather stays bounded; each block gathers its
selected rows once (they serve as keys and as values), drops the index columns no query of the
block uses (early HCA queries see few compressed entries) and dequantises FP8 rows after the gather,
so only selected rows are ever read.
"""

from __future__ import annotations

import torch

from .common import FP8KV, flat_row_ids

# Largest [b, block, k, max(d, h)] fp32 working set of one query block, in elements.
GATHER_BUDGET = 1 << 24


def attend_with_sink(scores: torch.Tensor, values: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """scores [.., h, k] fp32 (-inf = masked), values [.., k, d] (shared by the heads), sink [h].

    Returns [.., h, d] fp32. A row with every score masked returns zeros."""
    probs = sink_softmax(scores, sink)
    return probs @ values.float()


def sink_softmax(scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Softmax over the keys and the sink, returned for the keys only: [.., h, k] fp32."""
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all-masked rows: avoid inf - inf
    exp = torch.exp(scores - m)
    denom = exp.sum(dim=-1, keepdim=True) + torch.exp(sink.float()[:, None] - m)
    # A row with a valid key has denom >= 1; the clamp only turns an all-masked row with a -inf
    # sink into zeros instead of 0 / 0.
    return exp / denom.clamp_min(torch.finfo(torch.float32).tiny)


def gather_kv_rows(kv: torch.Tensor | FP8KV, indices: torch.Tensor,
                   block_table: torch.Tensor | None = None) -> torch.Tensor:
    """The rows `indices` [b, q, k] (>= 0) select, fp32 [b, q, k, d]; kv contiguous [b, n, d] or
    paged [pages, page_size, d] (with block_table [b, pages per sequence]), plain or FP8KV."""
    b, q, k = indices.shape
    per_seq = kv.rows_shape[1] if isinstance(kv, FP8KV) else kv.size(1)  # rows per sequence or page
    flat = flat_row_ids(indices, per_seq, block_table).view(-1)  # [b*q*k]
    if isinstance(kv, FP8KV):
        rows = kv.select_rows(flat).dequantize(torch.float32)
    else:
        rows = kv.reshape(-1, kv.size(-1)).index_select(0, flat).float()
    return rows.view(b, q, k, -1)


def sparse_attention_reference(q: torch.Tensor, kv: torch.Tensor | FP8KV, sink: torch.Tensor,
                               indices: torch.Tensor, scale: float, query_block: int = 256,
                               block_table: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, s, h, d], kv as in `gather_kv_rows`, sink [h], indices [b, s, k] (-1 = masked) -> [b, s, h, d]
    in q.dtype. Differentiable in q, sink and (plain) kv."""
    b, s, h, d = q.shape
    k = indices.size(-1)
    block = max(1, min(query_block, GATHER_BUDGET // max(1, b * k * max(d, h))))
    out = q.new_zeros(q.shape)  # blocks are written in place (autograd records the copies)
    for start in range(0, s, block):
        idx = indices[:, start:start + block]  # [b, n, k]
        used = (idx >= 0).any(dim=1).any(dim=0)  # [k]: columns some query of the block uses
        if not bool(used.all()):
            idx = idx[:, :, used]
        if idx.size(-1) == 0:
            continue  # nothing to see: zeros
        rows = gather_kv_rows(kv, idx.clamp_min(0), block_table)  # [b, n, k, d] fp32
        scores = torch.einsum("bqhd,bqkd->bqhk", q[:, start:start + block].float(), rows)
        scores = (scores * scale).masked_fill_((idx < 0)[:, :, None, :], float("-inf"))
        out[:, start:start + block] = attend_with_sink(scores, rows, sink)  # [b, n, h, d]
    return out
