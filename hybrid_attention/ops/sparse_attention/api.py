"""sparse_attention(q, kv, sink, indices, scale): attention of each query over its own list of KV rows."""

from __future__ import annotations

import torch

from .reference import sparse_attention_reference

BACKENDS = ("auto", "torch")


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, indices: torch.Tensor,
                     scale: float, backend: str = "auto", query_block: int = 256) -> torch.Tensor:
    """o[b, t, h] = softmax over {kv[b, indices[b, t, j]] : j} plus the sink, applied to those rows.

    q [b, s, h, d], kv [b, n, d] (one KV head shared by all query heads, key = value), sink [h]
    (a logit with a zero value vector), indices [b, s, k] int (-1 = masked). Returns [b, s, h, d]
    in q.dtype. Queries whose list is all -1 get a zero output.
    """
    if not torch.compiler.is_compiling():
        _validate(q, kv, sink, indices)
    match backend:
        case "auto" | "torch":
            return sparse_attention_reference(q, kv, sink, indices, scale, query_block)
        case _:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _validate(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, indices: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, seq, heads, head_dim], got shape {tuple(q.shape)}")
    b, s, h, d = q.shape
    if kv.dim() != 3 or kv.size(0) != b or kv.size(2) != d:
        raise ValueError(f"kv must be [{b}, rows, {d}], got shape {tuple(kv.shape)}")
    if sink.shape != (h,):
        raise ValueError(f"sink must be [{h}], got shape {tuple(sink.shape)}")
    if indices.dim() != 3 or indices.shape[:2] != (b, s):
        raise ValueError(f"indices must be [{b}, {s}, k], got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.numel() and (indices.max() >= kv.size(1) or indices.min() < -1):
        raise ValueError(f"indices must lie in [-1, {kv.size(1)}), got "
                         f"[{int(indices.min())}, {int(indices.max())}]")
