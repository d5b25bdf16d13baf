"""Triton kernels of the compressor's pooling (SPEC.md section 5.2), forward and backward.

One program per (entry, block of output features, sequence) loads the entry's slots as
[BLOCK_R, BLOCK_F] tiles (the current block, and with overlap the previous block's first half of
the features), adds ape, and takes the softmax over the slot axis for every feature in fp32.

Backward recomputes the softmax; with p the slot weights, e the entry and g its gradient:
dkv = p * g, dscore = p * (kv - e) * g. Every (token, feature) of the input feeds at most one
(entry, slot), so each program writes its own part of dkv / dscore with plain stores; dape is the
sum of dscore over blocks (in torch). `previous` is treated as a constant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import next_power_of_2


@triton.jit
def _slots(kv_ptr, score_ptr, ape_ptr, pkv_ptr, pscore_ptr, batch, entry, seq_len, feat, f_ok, slot,
           WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, RATIO: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, OVERLAP: tl.constexpr, HAS_PREVIOUS: tl.constexpr,
           PREVIOUS_BLOCK: tl.constexpr):
    """(values, logits, element offsets in kv / score) of one slot group, [BLOCK_R, BLOCK_F] each.

    PREVIOUS_BLOCK=False: block `entry`, features [d, 2d) with overlap (else [0, d)).
    PREVIOUS_BLOCK=True: block `entry - 1` (or `previous` / empty for entry 0), features [0, d).
    Masked slots have logit -inf and value 0."""
    s_ok = slot < RATIO
    mask = s_ok[:, None] & f_ok[None, :]
    column = feat + HEAD_DIM if (OVERLAP and not PREVIOUS_BLOCK) else feat
    token = (entry - 1 if PREVIOUS_BLOCK else entry) * RATIO + slot
    offset = (batch.to(tl.int64) * seq_len + token)[:, None] * WIDTH + column[None, :]
    ape = tl.load(ape_ptr + slot[:, None] * WIDTH + column[None, :], mask=mask, other=0.0).to(tl.float32)
    values = tl.load(kv_ptr + offset, mask=mask & (token >= 0)[:, None], other=0.0).to(tl.float32)
    logits = tl.load(score_ptr + offset, mask=mask & (token >= 0)[:, None], other=0.0).to(tl.float32) + ape
    if PREVIOUS_BLOCK:
        if entry == 0:
            if HAS_PREVIOUS:  # the compressor state's last block; its scores already include ape
                p_off = (batch.to(tl.int64) * RATIO + slot)[:, None] * WIDTH + column[None, :]
                values = tl.load(pkv_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
                logits = tl.load(pscore_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
            else:  # a fresh sequence: empty slots
                logits = tl.full([BLOCK_R, BLOCK_F], float("-inf"), tl.float32)
    logits = tl.where(mask, logits, float("-inf"))
    return values, logits, offset


@triton.jit
def _pool(kv_ptr, score_ptr, ape_ptr, pkv_ptr, pscore_ptr, batch, entry, seq_len, feat, f_ok, slot,
          WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, RATIO: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_F: tl.constexpr, OVERLAP: tl.constexpr, HAS_PREVIOUS: tl.constexpr):
    """Entry `entry` for the features `feat`: (slot weights, values and offsets of the current block,
    the same of the previous block (copies of the current ones without overlap), pooled entry)."""
    v, z, offset = _slots(kv_ptr, score_ptr, ape_ptr, pkv_ptr, pscore_ptr, batch, entry, seq_len, feat,
                          f_ok, slot, WIDTH, HEAD_DIM, RATIO, BLOCK_R, BLOCK_F, OVERLAP, HAS_PREVIOUS, False)
    m = tl.max(z, axis=0)
    pv, pz, p_offset = v, z, offset
    if OVERLAP:
        pv, pz, p_offset = _slots(kv_ptr, score_ptr, ape_ptr, pkv_ptr, pscore_ptr, batch, entry, seq_len,
                                  feat, f_ok, slot, WIDTH, HEAD_DIM, RATIO, BLOCK_R, BLOCK_F, OVERLAP,
                                  HAS_PREVIOUS, True)
        m = tl.maximum(m, tl.max(pz, axis=0))
    m = tl.where(f_ok, m, 0.0)  # padding features: every logit is -inf
    e = tl.exp(z - m[None, :])
    den = tl.sum(e, axis=0)
    num = tl.sum(e * v, axis=0)
    pe = e
    if OVERLAP:
        pe = tl.exp(pz - m[None, :])
        den += tl.sum(pe, axis=0)
        num += tl.sum(pe * pv, axis=0)
    den = tl.where(f_ok, den, 1.0)
    return e / den[None, :], v, offset, pe / den[None, :], pv, p_offset, num / den


@triton.jit
def _compress_fwd(kv_ptr, score_ptr, ape_ptr, pkv_ptr, pscore_ptr, out_ptr, seq_len, n_entries,
                  WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, RATIO: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_F: tl.constexpr, OVERLAP: tl.constexpr, HAS_PREVIOUS: tl.constexpr):
    entry, batch = tl.program_id(0), tl.program_id(2)
    feat = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = feat < HEAD_DIM
    _, _, _, _, _, _, out = _pool(kv_ptr, score_ptr, ape_ptr, pkv_ptr, pscore_ptr, batch, entry, seq_len,
                                  feat, f_ok, tl.arange(0, BLOCK_R), WIDTH, HEAD_DIM, RATIO, BLOCK_R,
                                  BLOCK_F, OVERLAP, HAS_PREVIOUS)
    tl.store(out_ptr + (batch.to(tl.int64) * n_entries + entry) * HEAD_DIM + feat, out, mask=f_ok)


@triton.jit
def _compress_bwd(kv_ptr, score_ptr, ape_ptr, pkv_ptr, pscore_ptr, dout_ptr, dkv_ptr, dscore_ptr,
                  seq_len, n_entries,
                  WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, RATIO: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_F: tl.constexpr, OVERLAP: tl.constexpr, HAS_PREVIOUS: tl.constexpr):
    entry, batch = tl.program_id(0), tl.program_id(2)
    feat = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = feat < HEAD_DIM
    slot = tl.arange(0, BLOCK_R)
    mask = (slot < RATIO)[:, None] & f_ok[None, :]
    p, v, offset, pp, pv, p_offset, out = _pool(kv_ptr, score_ptr, ape_ptr, pkv_ptr, pscore_ptr, batch, entry,
                                                seq_len, feat, f_ok, slot, WIDTH, HEAD_DIM, RATIO, BLOCK_R,
                                                BLOCK_F, OVERLAP, HAS_PREVIOUS)
    g = tl.load(dout_ptr + (batch.to(tl.int64) * n_entries + entry) * HEAD_DIM + feat, mask=f_ok, other=0.0)
    tl.store(dkv_ptr + offset, p * g[None, :], mask=mask)
    tl.store(dscore_ptr + offset, p * (v - out[None, :]) * g[None, :], mask=mask)
    if OVERLAP:
        if entry > 0:  # entry 0's previous block is `previous` (a constant) or empty
            tl.store(dkv_ptr + p_offset, pp * g[None, :], mask=mask)
            tl.store(dscore_ptr + p_offset, pp * (pv - out[None, :]) * g[None, :], mask=mask)


def _launch(kernel, kv, score, ape, ratio, overlap, previous, *tensors):
    b, s, width = kv.shape
    head_dim = width // 2 if overlap else width
    n = s // ratio
    block_r = next_power_of_2(ratio, at_least=1)
    block_f = min(next_power_of_2(head_dim), max(16, 4096 // block_r))
    prev_kv, prev_score = previous if previous is not None else (kv, score)  # unused without previous
    grid = (n, triton.cdiv(head_dim, block_f), b)
    kernel[grid](kv, score, ape, prev_kv, prev_score, *tensors, s, n, WIDTH=width, HEAD_DIM=head_dim,
                 RATIO=ratio, BLOCK_R=block_r, BLOCK_F=block_f, OVERLAP=overlap,
                 HAS_PREVIOUS=previous is not None, num_warps=4)


class _Compress(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, score, ape, ratio, overlap, prev_kv, prev_score):
        b, s, width = kv.shape
        n = s // ratio
        previous = (prev_kv, prev_score) if prev_kv is not None else None
        out = torch.empty(b, n, width // 2 if overlap else width, device=kv.device, dtype=torch.float32)
        if out.numel():
            _launch(_compress_fwd, kv, score, ape, ratio, overlap, previous, out)
        ctx.save_for_backward(kv, score, ape, prev_kv, prev_score)
        ctx.ratio, ctx.overlap = ratio, overlap
        return out

    @staticmethod
    def backward(ctx, dout):
        kv, score, ape, prev_kv, prev_score = ctx.saved_tensors
        ratio, overlap = ctx.ratio, ctx.overlap
        previous = (prev_kv, prev_score) if prev_kv is not None else None
        dkv = torch.zeros(kv.shape, device=kv.device, dtype=torch.float32)
        dscore = torch.zeros_like(dkv)
        if dout.numel():
            _launch(_compress_bwd, kv, score, ape, ratio, overlap, previous, dout.float().contiguous(),
                    dkv, dscore)
        b, s, width = kv.shape
        n = s // ratio
        dape = dscore[:, :n * ratio].view(b, n, ratio, width).sum(dim=(0, 1))  # logit = score + ape
        return dkv.to(kv.dtype), dscore.to(score.dtype), dape.to(ape.dtype), None, None, None, None


def compress_triton(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor | None, ratio: int,
                    overlap: bool, previous: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The Triton backend of `compress` (inputs validated); differentiable in kv, score and ape
    (None: a zero bias, the scores holding it already)."""
    if ape is None:
        ape = kv.new_zeros(ratio, kv.size(-1), dtype=torch.float32)
    kv, score, ape = kv.contiguous(), score.contiguous(), ape.contiguous()
    prev_kv, prev_score = (previous[0].detach().contiguous(), previous[1].detach().contiguous()) \
        if previous is not None else (None, None)
    return _Compress.apply(kv, score, ape, ratio, overlap, prev_kv, prev_score)
