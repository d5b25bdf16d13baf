"""Triton kernels of sparse attention with a sink (SPEC.md section 7), forward and backward.

One program per (query token, block of heads). All heads share the one KV head, so the heads are
the rows of the tensor-core dots: S = Q[heads, d] @ K[chunk, d]^T for each chunk of BLOCK_K indices.

Forward: online softmax over the chunks. Rows with index -1 are never loaded and score -inf; the
running max ignores the sink, which joins only the denominator at the end, so a chunk (even the
first) that is all -1 is harmless. Stores o and the log of the full denominator (lse) for backward;
`sparse_attention_triton_with_lse` returns lse too, for callers that need the probabilities.

Backward: recompute P = exp(S - lse) per chunk; dS = P * (dP - delta) with delta = rowsum(dO * O);
dq accumulates in registers; the row gradients dkv = P^T dO + scale * dS^T Q (key = value) go to an
fp32 buffer by atomic adds, since many queries share a row. dsink = -sum P_sink * delta in torch.

KV rows are addressed through (dim0, dim1) of the storage: (sequence, row) for contiguous rows or
(page, offset) through the block table; FP8 rows are decoded in registers (values times their
power-of-two scale, exact in bf16) right after the load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import convert, decode_e4m3, mma, next_power_of_2, pow2
from .common import FP8_BLOCK, FP8KV

_SCALE_BLOCK = tl.constexpr(FP8_BLOCK)


@triton.jit
def _row_address(idx, batch, table_ptr, pages_per_seq, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr):
    """Index list entries -> (dim0, dim1) of the KV storage, int64; -1 entries give (batch, 0)."""
    row = tl.where(idx >= 0, idx, 0).to(tl.int64)
    if PAGED:
        page = tl.load(table_ptr + batch * pages_per_seq + row // PAGE_SIZE, mask=idx >= 0, other=0)
        dim0, dim1 = page.to(tl.int64), row % PAGE_SIZE
    else:
        dim0, dim1 = tl.zeros_like(row) + batch, row
    return dim0, dim1


@triton.jit
def _load_rows(kv_ptr, exp_ptr, rope_ptr, dim0, dim1, valid, cols,
               s_kv0, s_kv1, s_e0, s_e1, s_r0, s_r1,
               HEAD_DIM: tl.constexpr, D_NOPE: tl.constexpr, KV_FP8: tl.constexpr, DTYPE: tl.constexpr):
    """The [BLOCK_K, BLOCK_D] tile of KV rows in DTYPE; invalid rows and padding columns are 0."""
    if KV_FP8:
        nope = valid[:, None] & (cols < D_NOPE)[None, :]
        byte = tl.load(kv_ptr + dim0[:, None] * s_kv0 + dim1[:, None] * s_kv1 + cols[None, :],
                       mask=nope, other=0)
        exponent = tl.load(exp_ptr + dim0[:, None] * s_e0 + dim1[:, None] * s_e1
                           + cols[None, :] // _SCALE_BLOCK, mask=nope, other=0)
        rows = decode_e4m3(byte) * pow2(exponent.to(tl.int32))
        if D_NOPE < HEAD_DIM:
            in_rope = valid[:, None] & ((cols >= D_NOPE) & (cols < HEAD_DIM))[None, :]
            rope = tl.load(rope_ptr + dim0[:, None] * s_r0 + dim1[:, None] * s_r1
                           + (cols - D_NOPE)[None, :], mask=in_rope, other=0.0)
            rows = tl.where((cols < D_NOPE)[None, :], rows, rope.to(tl.float32))
        tile = rows.to(DTYPE)  # exact: e4m3 values times powers of two are bf16 values
    else:
        tile = tl.load(kv_ptr + dim0[:, None] * s_kv0 + dim1[:, None] * s_kv1 + cols[None, :],
                       mask=valid[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
        tile = convert(tile, DTYPE)
    return tile


@triton.jit
def _sparse_attention_fwd(q_ptr, kv_ptr, exp_ptr, rope_ptr, sink_ptr, idx_ptr, table_ptr, o_ptr, lse_ptr,
                          scale, n_heads, n_idx, pages_per_seq,
                          s_kv0, s_kv1, s_e0, s_e1, s_r0, s_r1,
                          HEAD_DIM: tl.constexpr, D_NOPE: tl.constexpr, PAGE_SIZE: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          KV_FP8: tl.constexpr, PAGED: tl.constexpr, IEEE: tl.constexpr):
    batch = tl.program_id(2)
    token = batch * tl.num_programs(0) + tl.program_id(0)  # q, o, lse and the index list are contiguous
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    head_ok = heads < n_heads
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    rows_q = (token * n_heads + heads).to(tl.int64)
    q = tl.load(q_ptr + rows_q[:, None] * HEAD_DIM + cols[None, :],
                mask=head_ok[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the scores, sink excluded
    total = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(0, n_idx, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + token.to(tl.int64) * n_idx + offs, mask=offs < n_idx, other=-1)
        valid = idx >= 0
        dim0, dim1 = _row_address(idx, batch, table_ptr, pages_per_seq, PAGE_SIZE, PAGED)
        kt = _load_rows(kv_ptr, exp_ptr, rope_ptr, dim0, dim1, valid, cols, s_kv0, s_kv1, s_e0, s_e1,
                        s_r0, s_r1, HEAD_DIM, D_NOPE, KV_FP8, DTYPE)  # [BLOCK_K, BLOCK_D]
        z = mma(q, tl.trans(kt), tl.zeros([BLOCK_H, BLOCK_K], tl.float32), IEEE) * scale
        z = tl.where(valid[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep 0 - -inf out
        alpha = tl.exp(m - m_safe)
        p = tl.exp(z - m_safe[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = mma(convert(p, DTYPE), kt, acc * alpha[:, None], IEEE)
        m = m_new

    m_safe = tl.where(m == float("-inf"), 0.0, m)
    sink = tl.load(sink_ptr + heads, mask=head_ok, other=float("-inf")).to(tl.float32)
    denom = total + tl.exp(sink - m_safe)
    # denom is 0 only when no row is valid and the sink is -inf: the output is then 0, lse -inf.
    seen = denom > 0
    safe = tl.where(seen, denom, 1.0)
    tl.store(o_ptr + rows_q[:, None] * HEAD_DIM + cols[None, :], convert(acc / safe[:, None], DTYPE),
             mask=head_ok[:, None] & (cols < HEAD_DIM)[None, :])
    tl.store(lse_ptr + rows_q, tl.where(seen, m_safe + tl.log(safe), float("-inf")), mask=head_ok)


@triton.jit
def _sparse_attention_bwd(q_ptr, kv_ptr, exp_ptr, rope_ptr, idx_ptr, table_ptr, do_ptr, lse_ptr,
                          delta_ptr, dq_ptr, dkv_ptr,
                          scale, n_heads, n_idx, pages_per_seq,
                          s_kv0, s_kv1, s_e0, s_e1, s_r0, s_r1, s_dkv0, s_dkv1,
                          HEAD_DIM: tl.constexpr, D_NOPE: tl.constexpr, PAGE_SIZE: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          KV_FP8: tl.constexpr, PAGED: tl.constexpr, IEEE: tl.constexpr,
                          NEED_DKV: tl.constexpr):
    batch = tl.program_id(2)
    token = batch * tl.num_programs(0) + tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    head_ok = heads < n_heads
    col_ok = cols < HEAD_DIM
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    rows_q = (token * n_heads + heads).to(tl.int64)
    tile_q = rows_q[:, None] * HEAD_DIM + cols[None, :]
    q = tl.load(q_ptr + tile_q, mask=head_ok[:, None] & col_ok[None, :], other=0.0)
    do = tl.load(do_ptr + tile_q, mask=head_ok[:, None] & col_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + rows_q, mask=head_ok, other=float("inf"))  # padding heads: P = 0
    delta = tl.load(delta_ptr + rows_q, mask=head_ok, other=0.0)

    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(0, n_idx, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + token.to(tl.int64) * n_idx + offs, mask=offs < n_idx, other=-1)
        valid = idx >= 0
        dim0, dim1 = _row_address(idx, batch, table_ptr, pages_per_seq, PAGE_SIZE, PAGED)
        kt = _load_rows(kv_ptr, exp_ptr, rope_ptr, dim0, dim1, valid, cols, s_kv0, s_kv1, s_e0, s_e1,
                        s_r0, s_r1, HEAD_DIM, D_NOPE, KV_FP8, DTYPE)
        z = mma(q, tl.trans(kt), tl.zeros([BLOCK_H, BLOCK_K], tl.float32), IEEE) * scale
        p = tl.where(valid[None, :], tl.exp(z - lse[:, None]), 0.0)  # [BLOCK_H, BLOCK_K]
        dp = mma(do, tl.trans(kt), tl.zeros([BLOCK_H, BLOCK_K], tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = mma(convert(ds, DTYPE), kt, dq, IEEE)
        if NEED_DKV:
            dkv = mma(tl.trans(convert(p, DTYPE)), do, tl.zeros([BLOCK_K, BLOCK_D], tl.float32), IEEE)
            dkv = mma(tl.trans(convert(ds * scale, DTYPE)), q, dkv, IEEE)
            tl.atomic_add(dkv_ptr + dim0[:, None] * s_dkv0 + dim1[:, None] * s_dkv1 + cols[None, :], dkv,
                          mask=valid[:, None] & col_ok[None, :])
    tl.store(dq_ptr + tile_q, convert(dq * scale, DTYPE), mask=head_ok[:, None] & col_ok[None, :])


def _launch_config(n_heads: int, head_dim: int, backward: bool) -> dict:
    """Heads per program and index chunk. Each program keeps [BLOCK_H, d] fp32 accumulators (and in
    backward a [BLOCK_K, d] fp32 row-gradient tile) in registers; these sizes are chosen for
    d = 512 on an H100-class GPU and have not been tuned there yet."""
    block_d = next_power_of_2(head_dim)
    block_k = 32 if backward or block_d >= 512 else 64
    return dict(BLOCK_H=16, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=8 if block_d >= 256 else 4)


def _storage(kv: torch.Tensor | FP8KV):
    """(pointers, strides, d_nope, fp8?) of the KV storage; the last dim of each part contiguous."""
    if isinstance(kv, FP8KV):
        values = kv.values.view(torch.uint8)
        rope = kv.rope if kv.rope is not None else values
        parts = (values, kv.exponents, rope)
        d_nope = kv.values.size(-1)
    else:
        parts = (kv, kv, kv)
        d_nope = kv.size(-1)
    for part in parts:
        if part.stride(-1) != 1:
            raise ValueError("the KV storage must be contiguous along its last dim for the Triton backend")
    strides = [s for part in parts for s in part.stride()[:2]]
    return parts, strides, d_nope, isinstance(kv, FP8KV)


def _kv_page_size(kv: torch.Tensor | FP8KV) -> int:
    return kv.rows_shape[1] if isinstance(kv, FP8KV) else kv.size(1)


def _common_args(q, kv, indices, block_table, backward):
    b, s, h, d = q.shape
    parts, strides, d_nope, fp8 = _storage(kv)
    paged = block_table is not None
    cfg = _launch_config(h, d, backward)
    grid = (s, triton.cdiv(h, cfg["BLOCK_H"]), b)  # (token, head block, sequence)
    table = block_table if paged else indices  # any int tensor: unused when not paged
    args = (table, h, indices.size(-1), table.size(-1) if paged else 0, strides)
    constants = dict(HEAD_DIM=d, D_NOPE=d_nope, PAGE_SIZE=_kv_page_size(kv) if paged else 1,
                     KV_FP8=fp8, PAGED=paged, IEEE=q.dtype == torch.float32, **cfg)
    return grid, parts, args, constants


def _forward(q, kv, sink, indices, scale, block_table):
    """-> o [b, s, h, d] in q.dtype, lse [b, s, h] fp32 (log of the full denominator, sink included)."""
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if q.numel() == 0:
        return o, lse
    grid, (values, exponents, rope), (table, h, n_idx, pages_per_seq, strides), constants = \
        _common_args(q, kv, indices, block_table, backward=False)
    _sparse_attention_fwd[grid](q, values, exponents, rope, sink, indices, table, o, lse,
                                scale, h, n_idx, pages_per_seq, *strides, **constants)
    return o, lse


def _backward(q, kv, indices, scale, block_table, o, lse, do, need_dkv):
    """-> dq [b, s, h, d], dkv (like the plain kv storage, or None), and delta = rowsum(dO * O)."""
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # [b, s, h]
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, device=q.device, dtype=torch.float32) if need_dkv else None
    if q.numel() == 0:
        return dq, dkv, delta
    grid, (values, exponents, rope), (table, h, n_idx, pages_per_seq, strides), constants = \
        _common_args(q, kv, indices, block_table, backward=True)
    target = dkv if need_dkv else lse  # any tensor: unused without NEED_DKV
    _sparse_attention_bwd[grid](q, values, exponents, rope, indices, table, do, lse, delta, dq, target,
                                scale, h, n_idx, pages_per_seq, *strides,
                                dkv.stride(0) if need_dkv else 0, dkv.stride(1) if need_dkv else 0,
                                NEED_DKV=need_dkv, **constants)
    return dq, dkv, delta


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, sink, indices, scale, block_table, fp8_kv):
        storage = fp8_kv if fp8_kv is not None else kv
        o, lse = _forward(q, storage, sink, indices, scale, block_table)
        ctx.save_for_backward(q, kv, sink, indices, block_table, o, lse)
        ctx.scale, ctx.fp8_kv = scale, fp8_kv
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, kv, sink, indices, block_table, o, lse = ctx.saved_tensors
        storage = ctx.fp8_kv if ctx.fp8_kv is not None else kv
        need_dkv = ctx.fp8_kv is None and ctx.needs_input_grad[1]
        dq, dkv, delta = _backward(q, storage, indices, ctx.scale, block_table, o, lse, do, need_dkv)
        # The sink is a logit with a zero value: dL/dsink = -sum over queries of P_sink * delta.
        p_sink = torch.where(torch.isfinite(lse), torch.exp(sink.float() - lse), torch.zeros_like(lse))
        dsink = -(p_sink * delta).sum(dim=(0, 1))
        return (dq, dkv.to(kv.dtype) if dkv is not None else None, dsink.to(sink.dtype),
                None, None, None, None)


def sparse_attention_triton(q: torch.Tensor, kv: torch.Tensor | FP8KV, sink: torch.Tensor,
                            indices: torch.Tensor, scale: float,
                            block_table: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton backend of `sparse_attention` (inputs already validated); differentiable in q,
    sink and plain kv."""
    return sparse_attention_triton_with_lse(q, kv, sink, indices, scale, block_table)[0]


def sparse_attention_triton_with_lse(q: torch.Tensor, kv: torch.Tensor | FP8KV, sink: torch.Tensor,
                                     indices: torch.Tensor, scale: float,
                                     block_table: torch.Tensor | None = None
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_attention_triton`'s output and the log-sum-exp lse [b, s, h] fp32 of each query's
    softmax (scaled scores and sink; -inf where there is nothing to attend to), so that a caller can
    recompute any probability as exp(scale * <q, row> - lse). lse carries no gradient."""
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton backend takes fp32, bf16 or fp16 queries, got {q.dtype}")
    q, indices = q.contiguous(), indices.contiguous()
    block_table = block_table.contiguous() if block_table is not None else None
    if isinstance(kv, FP8KV):
        return _SparseAttention.apply(q, None, sink, indices, float(scale), block_table, kv)
    return _SparseAttention.apply(q, kv, sink, indices, float(scale), block_table, None)
