"""joint_attention: each query of a window / HCA / CSA layer over its window rows, its compressed
entries and the sink, in one softmax (SPEC.md sections 4 and 7), with the keys described by their
structure rather than by a list of rows per query."""

from __future__ import annotations

import torch

from ..dispatch import resolve_backend
from .cpu import joint_attention_cpu

# What the Triton kernels compute in; "auto" leaves fp64 (the gradient checks) to the torch backend.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def joint_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float, window_size: int,
                    start: int = 0, compressed: torch.Tensor | None = None, ratio: int = 0,
                    picks: torch.Tensor | None = None, want_teacher: bool = False,
                    backend: str = "auto",
                    memo: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o [b, s, h, d] fp32 and, with `want_teacher`, the indexer loss's teacher [b, s, k] fp32.

    q [b, s, h, d]: the chunk's queries, query t at absolute position start + t.
    kv [b, c + s, d]: the shared key = value rows: c = min(start, window_size - 1) rows before the
      chunk, then one row per query. Query t's window is the rows of positions t - win + 1 .. t.
    compressed [b, n, d] (HCA / CSA): compressed entries; entry i is visible to positions p with
      i < (p + 1) // ratio. Without `picks` a query attends to every visible entry (HCA, the dense
      CSA warm-up); with picks [b, s, k] (int64, -1 = none) only to those (CSA).
    sink [h]: one logit per head with a zero value vector.
    teacher: the compressed entries' share of each query's joint softmax, summed over heads
      ([b, s, k] with picks, [b, s, n] without); not differentiable.

    Differentiable in q, kv, compressed and sink. backend: "torch" (`cpu.py`, a query block at a
    time in forward and backward), "triton" (`triton.py`: the SPEC 4 row lists through the
    sparse-attention kernels, forward and backward) or "auto" (Triton for CUDA tensors that are
    not fp64). `reference.py` is the oracle of both.

    memo: for activation checkpointing, which runs a forward again in backward to differentiate
      it. The torch backend keeps its first call's output and teacher in the dict and,
      called again with the same dict and the same inputs, takes them from there (once) instead of
      computing the forward a second time: the rerun then costs only the backward. The price is the
      output [b, s, h, d] held from forward to backward. The Triton backend ignores it.
    """
    if not torch.compiler.is_compiling():
        _validate(q, kv, sink, window_size, start, compressed, ratio, picks)
    chosen = resolve_backend(backend, q)
    if chosen == "triton" and (backend == "triton" or q.dtype in TRITON_DTYPES):
        from .triton import joint_attention_triton

        return joint_attention_triton(q, kv, sink, scale, window_size, start, compressed, ratio, picks,
                                      want_teacher)
    return joint_attention_cpu(q, kv, sink, scale, window_size, start, compressed, ratio, picks,
                               want_teacher, memo)


def _validate(q, kv, sink, window_size, start, compressed, ratio, picks) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not q.is_floating_point():
        raise ValueError(f"q must be a float [batch, seq, heads, head_dim] tensor, got "
                         f"{getattr(q, 'shape', type(q).__name__)}")
    b, s, h, d = q.shape
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be a positive int, got {window_size!r}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    context = min(start, window_size - 1)
    if not isinstance(kv, torch.Tensor) or tuple(kv.shape) != (b, context + s, d):
        raise ValueError(f"kv must be [{b}, {context + s}, {d}] (min(start, window_size - 1) rows of "
                         f"context, then the chunk's), got {tuple(getattr(kv, 'shape', ()))}")
    if not isinstance(sink, torch.Tensor) or tuple(sink.shape) != (h,):
        raise ValueError(f"sink must be [{h}], got {tuple(getattr(sink, 'shape', ()))}")
    if compressed is None:
        if picks is not None:
            raise ValueError("picks select compressed entries: give compressed too")
        return
    if not isinstance(compressed, torch.Tensor) or compressed.dim() != 3 \
            or tuple(compressed.shape[::2]) != (b, d):
        raise ValueError(f"compressed must be [{b}, entries, {d}], got "
                         f"{tuple(getattr(compressed, 'shape', ()))}")
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int with compressed entries, got {ratio!r}")
    if (start + s) // ratio > compressed.size(1):
        raise ValueError(f"compressed holds {compressed.size(1)} entries, the chunk's last query sees "
                         f"{(start + s) // ratio}")
    if picks is not None:
        if not isinstance(picks, torch.Tensor) or picks.dim() != 3 or tuple(picks.shape[:2]) != (b, s) \
                or picks.dtype != torch.int64:
            raise ValueError(f"picks must be int64 [{b}, {s}, k], got "
                             f"{getattr(picks, 'dtype', None)} {tuple(getattr(picks, 'shape', ()))}")
        if not picks.is_cuda and picks.numel() and (int(picks.max()) >= compressed.size(1)
                                                     or int(picks.min()) < -1):
            raise ValueError(f"picks must lie in [-1, {compressed.size(1)}), got "
                             f"[{int(picks.min())}, {int(picks.max())}]")
