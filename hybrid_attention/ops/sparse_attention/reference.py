"""Readable torch reference of sparse attention with a sink (SPEC.md section 7): the oracle.

For query (b, t), head h, valid rows V = {j : idx[b, t, j] != -1}:
    z_j  = scale * <q[b, t, h], kv[b, idx_j]>          fp32
    m    = max_j z_j                                    (the sink is not part of the max)
    o    = sum_j e^(z_j - m) kv[b, idx_j] / (sum_j e^(z_j - m) + e^(sink[h] - m))
Queries are processed in blocks so the [block, k, d] gather stays bounded.
"""

from __future__ import annotations

import torch


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
    return exp / denom


def sparse_attention_reference(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor,
                               indices: torch.Tensor, scale: float, query_block: int = 256
                               ) -> torch.Tensor:
    b, s, h, d = q.shape
    out = []
    for start in range(0, s, query_block):
        idx = indices[:, start:start + query_block].long()  # [b, q, k]
        n_q, k = idx.shape[1], idx.shape[2]
        rows = kv.gather(1, idx.clamp_min(0).reshape(b, n_q * k, 1).expand(-1, -1, d))
        rows = rows.view(b, n_q, k, d).float()  # [b, q, k, d]
        scores = torch.einsum("bqhd,bqkd->bqhk", q[:, start:start + query_block].float(), rows)
        scores = (scores * scale).masked_fill((idx < 0)[:, :, None, :], float("-inf"))
        out.append(attend_with_sink(scores, rows, sink))  # [b, q, h, d]
    return torch.cat(out, dim=1).to(q.dtype) if out else q.new_zeros(q.shape)
