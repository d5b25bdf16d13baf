"""sparse_attention(q, kv, sink, indices, scale): attention of each query over its own list of KV rows."""

from __future__ import annotations

import torch

from ...checks import check_int, check_positive_finite, check_same_device, check_tensor
from ..dispatch import resolve_backend
from .common import FP8_BLOCK, FP8KV
from .reference import sparse_attention_reference


def sparse_attention(q: torch.Tensor, kv: torch.Tensor | FP8KV, sink: torch.Tensor, indices: torch.Tensor,
                     scale: float, backend: str = "auto", query_block: int = 256,
                     block_table: torch.Tensor | None = None) -> torch.Tensor:
    """o[b, t, h] = softmax over {kv[b, indices[b, t, j]] : j} plus the sink, applied to those rows.

    q [b, s, h, d], kv [b, n, d] (one KV head shared by all query heads, key = value), sink [h]
    (a logit with a zero value vector), indices [b, s, k] int (-1 = masked). Returns [b, s, h, d]
    in q.dtype. Queries whose list is all -1 get a zero output.

    kv may also be an `FP8KV` (FP8 rows with power-of-two scales, decoded as they are read), and
    paged: with block_table [b, pages per sequence] (int), kv is a pool [pages, page_size, d] and
    row i of sequence b lives in page block_table[b, i // page_size] at offset i % page_size.

    backend: "torch" (blocked gathers, `query_block` queries at a time: the CPU path), "triton"
    (fused kernels, forward and backward), or "auto" (Triton for CUDA tensors, else torch).
    Gradients flow to q, sink and a plain kv with either backend.

    Shapes and dtypes are always checked; index and page values only for CPU tensors, since reading
    them would synchronise the device (on CUDA an index past the buffer is undefined behaviour).
    """
    if not torch.compiler.is_compiling():
        _validate(q, kv, sink, indices, scale, query_block, block_table)
    backend = resolve_backend(backend, q)
    if backend == "triton":
        from .triton import sparse_attention_triton

        return sparse_attention_triton(q, kv, sink, indices, scale, block_table)
    return sparse_attention_reference(q, kv, sink, indices, scale, query_block, block_table)


def _validate(q: torch.Tensor, kv: torch.Tensor | FP8KV, sink: torch.Tensor, indices: torch.Tensor,
              scale: float, query_block: int, block_table: torch.Tensor | None) -> None:
    check_tensor("q", q)
    check_tensor("sink", sink)
    check_tensor("indices", indices)
    if block_table is not None:
        check_tensor("block_table", block_table)
    check_positive_finite("scale", scale)
    check_int("query_block", query_block, 1)
    if q.dim() != 4 or not q.is_floating_point():
        raise ValueError(f"q must be a float [batch, seq, heads, head_dim] tensor, got {q.dtype} "
                         f"{tuple(q.shape)}")
    b, s, h, d = q.shape
    check_values = not q.is_cuda  # reading index values would synchronise the device
    lead = "pages, page_size" if block_table is not None else f"{b}, rows"
    if isinstance(kv, FP8KV):
        _validate_fp8(q, kv, d, lead)
        rows_shape = kv.rows_shape
        if block_table is None and rows_shape[0] != b:
            raise ValueError(f"FP8KV holds rows of {rows_shape[0]} sequences, q has batch {b}")
    else:
        if not isinstance(kv, torch.Tensor):
            raise TypeError(f"kv must be a torch.Tensor or an FP8KV, got {type(kv).__name__}")
        if kv.dim() != 3 or kv.size(2) != d or (block_table is None and kv.size(0) != b):
            raise ValueError(f"kv must be [{lead}, {d}], got shape {tuple(kv.shape)}")
        if not kv.is_floating_point():
            raise ValueError(f"kv must be a float tensor, got {kv.dtype}")
        check_same_device(q=q, kv=kv)
        rows_shape = tuple(kv.shape[:2])
    if sink.shape != (h,) or not sink.is_floating_point():
        raise ValueError(f"sink must be a float [{h}] tensor, got {sink.dtype} {tuple(sink.shape)}")
    check_same_device(q=q, sink=sink, indices=indices, block_table=block_table)
    if indices.dim() != 3 or indices.shape[:2] != (b, s):
        raise ValueError(f"indices must be [{b}, {s}, k], got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    n_rows = rows_shape[1]
    if block_table is not None:
        if block_table.dim() != 2 or block_table.size(0) != b:
            raise ValueError(f"block_table must be [{b}, pages per sequence], got shape "
                             f"{tuple(block_table.shape)}")
        if block_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_table must be int32 or int64, got {block_table.dtype}")
        if check_values and block_table.numel() \
                and (block_table.min() < 0 or block_table.max() >= rows_shape[0]):
            raise ValueError(f"block_table entries must lie in [0, {rows_shape[0]}) (the pages of kv), "
                             f"got [{int(block_table.min())}, {int(block_table.max())}]")
        n_rows = block_table.size(1) * rows_shape[1]
    if check_values and indices.numel() and (indices.max() >= n_rows or indices.min() < -1):
        raise ValueError(f"indices must lie in [-1, {n_rows}), got "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def _validate_fp8(q: torch.Tensor, kv: FP8KV, d: int, lead: str) -> None:
    values, exponents, rope = kv.values, kv.exponents, kv.rope
    check_tensor("FP8KV.values", values)
    check_tensor("FP8KV.exponents", exponents)
    if rope is not None:
        check_tensor("FP8KV.rope", rope)
    if values.dtype != torch.float8_e4m3fn or values.dim() != 3:
        raise ValueError(f"FP8KV.values must be float8_e4m3fn [{lead}, d_nope], got {values.dtype} "
                         f"{tuple(values.shape)}")
    d_nope = values.size(-1)
    if d_nope % FP8_BLOCK or exponents.dtype != torch.int8 \
            or tuple(exponents.shape) != (*values.shape[:2], d_nope // FP8_BLOCK):
        raise ValueError(f"FP8KV.exponents must be int8 [{lead}, {d_nope // FP8_BLOCK}] (one per "
                         f"{FP8_BLOCK} values, d_nope={d_nope}), got {exponents.dtype} "
                         f"{tuple(exponents.shape)}")
    d_rope = rope.size(-1) if rope is not None else 0
    if rope is not None and (rope.dim() != 3 or rope.shape[:2] != values.shape[:2]):
        raise ValueError(f"FP8KV.rope must be [{lead}, d_rope], got shape {tuple(rope.shape)}")
    if d_nope + d_rope != d:
        raise ValueError(f"FP8KV rows have {d_nope} FP8 + {d_rope} rope dims, q has head_dim {d}")
    check_same_device(q=q, **{"FP8KV.values": values, "FP8KV.exponents": exponents, "FP8KV.rope": rope})
