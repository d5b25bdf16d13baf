"""Triton kernel of the lightning indexer: fused scoring and a running top-k (SPEC.md sections 6, 12).

One program per (block of BLOCK_Q queries, split of the entries, sequence). It walks the entries its
queries can see in tiles of TOPK_BLOCK (the smallest power of two >= k) and, per tile:

  1. scores it: for each chunk of HEAD_CHUNK heads, one tensor-core dot of the [BLOCK_Q * HEAD_CHUNK,
     di] queries with the [TOPK_BLOCK, di] keys, then relu, the head weight, and the sum over heads,
     with the per-head roundings of the reference (`index_scores`) when q is bf16;
  2. packs each score with its entry id into one int64 sort key, (order-preserving score bits << 32)
     | (2^32 - 1 - id), so "larger key" means "higher score, then lower id" (the deterministic ties),
     and hidden entries get the smallest key;
  3. merges it into the running best TOPK_BLOCK keys per query, kept sorted in descending order: the
     tile sorted ascending, an element-wise max with the buffer (that is the top half of the union,
     as a bitonic sequence), then a bitonic merge. Tiles with nothing above the buffer's minimum skip
     this.

The scores live only in registers. A single split emits the ids directly (ascending, -1 padded);
several splits (decode: few queries, many entries) write their sorted buffers to a small workspace
[b, s, splits, TOPK_BLOCK] that a second kernel merges the same way.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..triton_common import decode_e2m1, mma, next_power_of_2, pow2, round_bf16
from .common import EMPTY_KEY, FP4_BLOCK, FP4Keys

# The packed (score, id) keys of `common.pack_scores`, built in registers here.
_EMPTY = tl.constexpr(EMPTY_KEY)  # below every packed score: hidden entries and padding
_LOW32 = tl.constexpr(2**32 - 1)


@triton.jit
def _pack(score, entry):
    """fp32 scores and int entry ids -> int64 keys ordered by (score, -id)."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in a float comparison
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed-int order = float order
    return (ordered.to(tl.int64) << 32) | (_LOW32 - entry.to(tl.int64))


@triton.jit
def _merge(best, tile_ascending):
    """Top TOPK_BLOCK of best (sorted descending) and a tile sorted ascending, sorted descending."""
    return tl.bitonic_merge(tl.maximum(best, tile_ascending), descending=True)


@triton.jit
def _emit(best, out_ptr, rows, row_ok, k, TOPK_BLOCK: tl.constexpr):
    """Write the first k entries of the sorted buffers as ascending ids, -1 for empty slots."""
    pos = tl.arange(0, TOPK_BLOCK)
    chosen = (pos[None, :] < k) & (best != _EMPTY)
    entry = _LOW32 - (best & _LOW32)
    ids = tl.sort(tl.where(chosen, entry, _LOW32))  # ascending, empty slots last
    ids = tl.where(ids == _LOW32, -1, ids).to(tl.int32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * k + pos[None, :], ids,
             mask=row_ok[:, None] & (pos[None, :] < k))


@triton.jit
def _load_keys(keys_ptr, kexp_ptr, batch, entry, entry_ok, cols, s_kb, s_kt, s_eb, s_et,
               HEAD_DIM: tl.constexpr, KEYS_FP4: tl.constexpr, DTYPE: tl.constexpr):
    """The [TOPK_BLOCK, BLOCK_DI] tile of keys in DTYPE (FP4 decoded exactly), 0 where masked."""
    mask = entry_ok[:, None] & (cols < HEAD_DIM)[None, :]
    row = batch.to(tl.int64) * s_kb + entry.to(tl.int64)[:, None] * s_kt
    if KEYS_FP4:
        byte = tl.load(keys_ptr + row + cols[None, :] // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((cols[None, :] % 2) * 4)) & 15  # low nibble first
        exponent = tl.load(kexp_ptr + batch.to(tl.int64) * s_eb + entry.to(tl.int64)[:, None] * s_et
                           + cols[None, :] // FP4_BLOCK, mask=mask, other=0)
        tile = (decode_e2m1(code) * pow2(exponent.to(tl.int32))).to(DTYPE)
    else:
        tile = tl.load(keys_ptr + row + cols[None, :], mask=mask, other=0.0)
    return tile


@triton.jit
def _indexer_topk_kernel(q_ptr, w_ptr, keys_ptr, kexp_ptr, vis_ptr, out_ptr, cand_ptr,
                         seq_len, n_keys, k, tiles_per_split, s_kb, s_kt, s_eb, s_et,
                         N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DI: tl.constexpr,
                         BLOCK_Q: tl.constexpr, HEAD_CHUNK: tl.constexpr, TOPK_BLOCK: tl.constexpr,
                         KEYS_FP4: tl.constexpr, ROUND_BF16: tl.constexpr, IEEE: tl.constexpr,
                         FINAL: tl.constexpr):
    split = tl.program_id(1)
    batch = tl.program_id(2)
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # query positions
    row_ok = rows < seq_len
    tokens = batch * seq_len + rows
    seen = tl.load(vis_ptr + tokens, mask=row_ok, other=0)  # [BLOCK_Q] visible entries
    # The dot rows: query r // HEAD_CHUNK, head (chunk start) + r % HEAD_CHUNK.
    r = tl.arange(0, BLOCK_Q * HEAD_CHUNK)
    r_token = batch * seq_len + tl.program_id(0) * BLOCK_Q + r // HEAD_CHUNK
    r_ok = tl.program_id(0) * BLOCK_Q + r // HEAD_CHUNK < seq_len
    cols = tl.arange(0, BLOCK_DI)
    col_ok = cols < HEAD_DIM

    best = tl.full([BLOCK_Q, TOPK_BLOCK], _EMPTY, tl.int64)
    n_tiles = tl.cdiv(tl.max(seen, axis=0), TOPK_BLOCK)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(n_tiles, first + tiles_per_split)):
        entry = tile * TOPK_BLOCK + tl.arange(0, TOPK_BLOCK)
        keys = _load_keys(keys_ptr, kexp_ptr, batch, entry, entry < n_keys, cols, s_kb, s_kt, s_eb, s_et,
                          HEAD_DIM, KEYS_FP4, DTYPE)
        total = tl.zeros([BLOCK_Q, TOPK_BLOCK], tl.float32)
        for chunk in range(0, tl.cdiv(N_HEADS, HEAD_CHUNK)):
            head = chunk * HEAD_CHUNK + r % HEAD_CHUNK
            ok = r_ok & (head < N_HEADS)  # padding heads score 0 * relu(0) = 0
            q_row = r_token.to(tl.int64) * N_HEADS + head
            q = tl.load(q_ptr + q_row[:, None] * HEAD_DIM + cols[None, :],
                        mask=ok[:, None] & col_ok[None, :], other=0.0)
            w = tl.load(w_ptr + q_row, mask=ok, other=0.0).to(tl.float32)
            dots = mma(q, tl.trans(keys), tl.zeros([BLOCK_Q * HEAD_CHUNK, TOPK_BLOCK], tl.float32), IEEE)
            if ROUND_BF16:  # the reference's bf16 einsum result, then its bf16 product with w
                per_head = round_bf16(tl.maximum(round_bf16(dots), 0.0) * w[:, None])
            else:
                per_head = tl.maximum(dots, 0.0) * w[:, None]
            total += tl.sum(tl.reshape(per_head, [BLOCK_Q, HEAD_CHUNK, TOPK_BLOCK]), axis=1)
        if ROUND_BF16:
            total = round_bf16(total)
        packed = tl.where(entry[None, :] < seen[:, None], _pack(total, entry[None, :]), _EMPTY)
        if tl.max(packed) > tl.min(best):
            best = _merge(best, tl.sort(packed))

    if FINAL:
        _emit(best, out_ptr, tokens, row_ok, k, TOPK_BLOCK)
    else:
        pos = tl.arange(0, TOPK_BLOCK)
        slot = tokens.to(tl.int64) * tl.num_programs(1) + split
        tl.store(cand_ptr + slot[:, None] * TOPK_BLOCK + pos[None, :], best, mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(cand_ptr, out_ptr, seq_len, k, splits,
                         BLOCK_Q: tl.constexpr, TOPK_BLOCK: tl.constexpr):
    batch = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < seq_len
    tokens = batch * seq_len + rows
    reverse = TOPK_BLOCK - 1 - tl.arange(0, TOPK_BLOCK)  # each split's buffer, read ascending
    best = tl.full([BLOCK_Q, TOPK_BLOCK], _EMPTY, tl.int64)
    for split in range(0, splits):
        slot = tokens.to(tl.int64) * splits + split
        tile = tl.load(cand_ptr + slot[:, None] * TOPK_BLOCK + reverse[None, :], mask=row_ok[:, None],
                       other=_EMPTY)
        best = _merge(best, tile)
    _emit(best, out_ptr, tokens, row_ok, k, TOPK_BLOCK)


def _launch_config(seq_len: int, k: int) -> dict:
    """BLOCK_Q queries x HEAD_CHUNK heads = 16 rows per dot (the tensor-core minimum); prefill
    takes 16 queries a head at a time (the reference's head order exactly), decode 1 query and 16
    heads. Not tuned on a GPU yet."""
    block_q = min(16, triton.next_power_of_2(max(1, seq_len)))
    topk_block = next_power_of_2(k)
    return dict(BLOCK_Q=block_q, HEAD_CHUNK=max(1, 16 // block_q), TOPK_BLOCK=topk_block,
                num_warps=8 if topk_block >= 256 else 4)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(programs: int, n_tiles: int, device: torch.device) -> int:
    """Split the entries when there are too few query blocks to fill the GPU (decode)."""
    if device.type != "cuda" or n_tiles <= 1:
        return 1
    return max(1, min(n_tiles, triton.cdiv(2 * _multiprocessors(device), programs)))


def indexer_topk_triton(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor | FP4Keys, k: int,
                        visible: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """The Triton backend of `indexer_topk` (inputs validated, visible [b, s] int32 <= t).
    `splits` overrides the number of entry splits (tests)."""
    if q.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the Triton indexer takes fp32 or bf16 queries, got {q.dtype}")
    b, s, hi, di = q.shape
    out = torch.full((b, s, k), -1, dtype=torch.int32, device=q.device)
    n_keys = keys.shape[1]
    if k == 0 or s == 0 or n_keys == 0:
        return out
    q, weights, visible = q.contiguous(), weights.contiguous(), visible.contiguous()
    if isinstance(keys, FP4Keys):
        values, exponents = keys.packed, keys.exponents
    else:
        values = exponents = keys
    if values.stride(-1) != 1 or exponents.stride(-1) != 1:
        raise ValueError("the keys must be contiguous along their last dim for the Triton backend")
    cfg = _launch_config(s, k)
    n_blocks = triton.cdiv(s, cfg["BLOCK_Q"])
    n_tiles = triton.cdiv(n_keys, cfg["TOPK_BLOCK"])
    splits = splits or _splits(b * n_blocks, n_tiles, q.device)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    final = splits == 1
    candidates = out if final else torch.empty(b, s, splits, cfg["TOPK_BLOCK"], dtype=torch.int64,
                                               device=q.device)
    _indexer_topk_kernel[(n_blocks, splits, b)](
        q, weights, values, exponents, visible, out, candidates,
        s, n_keys, k, tiles_per_split, values.stride(0), values.stride(1), exponents.stride(0),
        exponents.stride(1), N_HEADS=hi, HEAD_DIM=di, BLOCK_DI=next_power_of_2(di),
        KEYS_FP4=isinstance(keys, FP4Keys), ROUND_BF16=q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32, FINAL=final, **cfg)
    if not final:
        _merge_splits_kernel[(n_blocks, 1, b)](candidates, out, s, k, splits, BLOCK_Q=cfg["BLOCK_Q"],
                                               TOPK_BLOCK=cfg["TOPK_BLOCK"], num_warps=cfg["num_warps"])
    return out
