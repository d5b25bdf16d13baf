"""Readable torch reference of the lightning indexer's scoring and top-k (SPEC.md section 6, with the
deterministic ties of section 12): the oracle, and the CPU path.

For query (b, t) and entry i < visible[b, t]:
    I[t, i] = sum_h w[t, h] * relu(q[t, h] . K[i])   (per-head products rounded to q.dtype, the
                                                       sum over heads in fp32, rounded once)
    picks   = the k entries with the largest I, ties to the lower entry index, in ascending order
    -1 fills the list when the query sees fewer than k entries.

Queries are scored a tile at a time against only the entries the tile can see, so memory stays
[tile, entries], never [queries, entries] (SPEC 9, limitation 1). Tiles are small enough for the
scores to stay in the CPU's cache between the GEMM, the per-head ReLU and weighting, and the
top-k. The scores are those of `indexer.index_scores` (same GEMMs, same roundings).

The top-k is a plain `torch.topk` of k + 1 on the scores: when the (k+1)-th best is below the k-th,
the k best are one set whatever the order among equals. The rows where the two tie take every
entry above the k-th score and then the entries equal to it in id order
(`lowest_index_ties`, the oracle's own rule), the set
that a top-k of packed (score, id) keys (`common.pack_scores`, as the Triton kernel builds them)
gives. Either way the set is that of `topk_lowest_index_ties`.
"""

from __future__ import annotations

import torch

from ...checks import check_int, check_tensor
from .common import FP4Keys

# Per-head products of one GEMM, [b, tile, heads, chunk], in elements (4 MB of fp32). A tile of
# queries meets its keys a chunk at a time, so the products stay in cache between the GEMM, the
# ReLU and weighting and the head sum. On a shared host a whole row of products per GEMM spills to
# the contended last-level cache: the indexer of a 32K CSA prefill took 1.8-2.6 s that way against
# 1.5-1.8 s in chunks, interleaved in one process (QUERY_TILE and SCORE_TILE were swept together).
SCORE_TILE = 1 << 20
QUERY_TILE = 128  # queries per GEMM (its M is QUERY_TILE * heads)
MIN_KEY_CHUNK = 256  # below this the GEMM gets too thin to run fast
# Scores of the query group that shares one top-k call, [b, group, entries], in elements (16 MB).
TOPK_GROUP = 1 << 22


def topk_lowest_index_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, ties broken by the lower index, in ascending order.

    torch.topk leaves the order of equal values unspecified (and it differs between devices); here
    the set depends only on the numbers, so prefill and streaming pick the same entries (SPEC 12).
    """
    check_tensor("scores", scores)
    check_int("k", k, 1)
    if scores.dim() == 0 or k > scores.size(-1):
        raise ValueError(f"k={k} must not exceed the number of scores per row, got shape "
                         f"{tuple(scores.shape)}")
    kth = scores.topk(k, dim=-1).values[..., -1:]  # the k-th largest value, [.., 1]
    return lowest_index_ties(scores, kth, k)


def lowest_index_ties(scores: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Given each row's k-th largest score kth [.., 1]: the ids of every score above it, then of the
    scores equal to it in index order until k are chosen, ascending [.., k]."""
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= room))
    return chosen.nonzero()[:, -1].view(*scores.shape[:-1], k)


def head_products(q: torch.Tensor, keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, m, di] @ keys [b, t, di]^T -> [b, m, t] in q.dtype (into `out` if given): one 2-D GEMM
    per sequence. (A batched bf16 matmul against the keys' transposed view copies the keys first on
    the CPU: 16 ms instead of 0.8 for 8 rows x 131072 keys. The 2-D GEMM reads them in place; the
    tests hold its scores to `indexer.index_scores` bit for bit.)"""
    if out is None:
        out = q.new_empty(q.size(0), q.size(1), keys.size(1))
    for i in range(q.size(0)):
        torch.mm(q[i], keys[i].t(), out=out[i])
    return out


def block_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                 workspace: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, n, hi, di], weights [b, n, hi], keys [b, t, di] -> fp32 [b, n, t], the values of
    `indexer.index_scores`: per-head products rounded to q.dtype, summed over heads in fp32.

    One GEMM for all heads; ReLU and weighting in place; then `head_sum` adds the heads in order in
    fp32 (and a bf16 total is rounded once), so the values are bit for bit those of the per-head
    loop. `workspace`: a flat q.dtype buffer of at least b*n*hi*t elements for the per-head
    products, reused across tiles (fresh large buffers cost page faults on CPU). `out`: an fp32
    [b, n, t] tensor (or view) to write the scores into."""
    b, n, hi, di = q.shape
    t = keys.size(1)
    products = None if workspace is None else workspace[: b * n * hi * t].view(b, n * hi, t)
    per_head = head_products(q.reshape(b, n * hi, di), keys, products)
    per_head = per_head.view(b, n, hi, t).clamp_min_(0).mul_(weights[..., None])  # relu, weight
    total = head_sum(per_head, out if q.dtype == torch.float32 else None)
    if q.dtype != torch.float32:
        total = total.to(q.dtype).float()  # a bf16 score: the fp32 sum rounded once
        return total if out is None else out.copy_(total)
    return total


def head_sum(per_head: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """per_head [b, n, hi, t] -> fp32 [b, n, t]: head 0 + head 1 + ... in that order, each addition
    rounded to fp32 (`indexer.index_scores`' loop). Not `per_head.sum(dim=2)`: torch's CPU sum adds
    a row's vectorised columns in order but its last few columns (past a multiple of the vector
    width) another way, so its bits would depend on where a tile's columns end."""
    if out is None:
        out = torch.empty(per_head[:, :, 0].shape, dtype=torch.float32, device=per_head.device)
    total = out
    total.copy_(per_head[:, :, 0])
    for h in range(1, per_head.size(2)):
        total.add_(per_head[:, :, h])
    return total


def best_values(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of scores [.., t] and their ids, in no order; ties at the
    k-th value are resolved arbitrarily (as by `torch.topk`, whose contract this is).

    Long rows are narrowed first. Deal the t columns into n = t / c groups (group j holds columns
    j, j + n, j + 2n, ...): a value above the k-th largest group maximum can only lie in one of the
    k groups with the largest maxima, and that k-th maximum is at most the row's k-th value (the k
    maxima are k values >= it). So the top-k of those k * c columns holds the row's top-k values.
    torch.topk costs a few ns per column; the group maxima (an elementwise max of c contiguous
    slices) cost a fraction of that, and the second top-k sees k * c columns instead of t."""
    t = scores.size(-1)
    c = 8 if t >= 40 * k else 4
    if t < 24 * k or t % c or not scores.is_contiguous():
        return scores.topk(k, dim=-1, sorted=False)
    rows, n = scores.reshape(-1, t), t // c
    maxima = rows.view(-1, c, n).amax(dim=1)  # [r, n]
    groups = maxima.topk(k, dim=-1, sorted=False).indices  # [r, k]
    columns = (groups[:, :, None] + torch.arange(0, t, n, device=scores.device)).view(-1, k * c)
    values, at = rows.gather(-1, columns).topk(k, dim=-1, sorted=False)
    ids = columns.gather(-1, at)
    return values.view(*scores.shape[:-1], k), ids.view(*scores.shape[:-1], k)


def top_entries(scores: torch.Tensor, seen: torch.Tensor, k: int) -> torch.Tensor:
    """fp32 scores [b, n, t], seen [b, n] (entries each query may see, <= t), k <= t -> int64 ids
    [b, n, k] of the k best visible entries, ties to the lower id, ascending, -1 past `seen`.
    Overwrites the hidden scores with -inf."""
    t = scores.size(-1)
    entry = torch.arange(t, device=scores.device)
    lo = int(seen.min())  # every query sees the columns before this one
    if lo < t:
        scores[..., lo:].masked_fill_(entry[lo:] >= seen[..., None], float("-inf"))
    few = seen <= k  # the query sees at most k entries: it takes all of them
    if k == t:
        ids, tied = entry.expand(*scores.shape[:-1], k), torch.zeros_like(few)
    else:
        # The k + 1 best: the set of k is unambiguous when the (k+1)-th is below the k-th.
        values, ids = best_values(scores, k + 1)
        last = values.argmin(dim=-1, keepdim=True)  # the (k+1)-th (one of them, if tied)
        kth = values.scatter(-1, last, float("inf")).amin(dim=-1)
        tied = (kth == values.gather(-1, last)[..., 0]) & ~few
        ids = ids.scatter_(-1, last, t).sort(dim=-1).values[..., :k]  # id t sorts last: dropped
    if few.any():
        ids = torch.where(few[..., None], entry[:k], ids)
    if tied.any():  # the rows where the k-th score ties: everything above it, then its lowest ids
        # (bf16 index scores make such rows common: a few passes, not a top-k of packed keys)
        ids[tied] = lowest_index_ties(scores[tied], kth[tied, None], k)
    return ids.masked_fill_(ids >= seen[..., None], -1)


def indexer_topk_reference(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor | FP4Keys, k: int,
                           visible: torch.Tensor, query_block: int | None = None) -> torch.Tensor:
    """q [b, s, hi, di], weights [b, s, hi], keys [b, t, di] (or FP4Keys), visible [b, s] (entries
    each query may see, <= t) -> entry ids [b, s, k] int32."""
    if isinstance(keys, FP4Keys):
        keys = keys.dequantize(q.dtype)  # every key is read once per call
    b, s, hi = q.shape[:3]
    workspace = q.new_empty(tile_products(b, s, hi, keys.size(1), query_block))

    def score(rows: slice, cols: slice, out: torch.Tensor) -> None:
        block_scores(q[:, rows], weights[:, rows], keys[:, cols], workspace, out=out)

    return tiled_topk(score, b, s, hi, keys.size(1), k, visible, query_block, q.device)


def tile_sizes(b: int, s: int, hi: int, n_keys: int, query_block: int | None,
               score_tile: int | None = None) -> tuple[int, int, int]:
    """(queries per tile, keys per GEMM, queries per top-k call) of `tiled_topk`; `score_tile`:
    per-head products per GEMM (default SCORE_TILE)."""
    tile = min(s, query_block or max(1, QUERY_TILE // b))
    chunk = max(MIN_KEY_CHUNK, (score_tile or SCORE_TILE) // (b * max(tile, 1) * hi) // 8 * 8)
    # A group of tiles shares one top-k call (fewer, larger calls); its scores fit TOPK_GROUP.
    group = query_block or tile * max(1, TOPK_GROUP // max(1, b * tile * n_keys))
    return tile, chunk, group


def tile_products(b: int, s: int, hi: int, n_keys: int, query_block: int | None,
                  score_tile: int | None = None) -> int:
    """Per-head products of one tile's GEMM at most: the workspace a scoring function needs."""
    tile, chunk, _ = tile_sizes(b, s, hi, n_keys, query_block, score_tile)
    return b * tile * hi * min(chunk, n_keys)


def tiled_topk(score, b: int, s: int, hi: int, n_keys: int, k: int, visible: torch.Tensor,
               query_block: int | None, device, score_tile: int | None = None) -> torch.Tensor:
    """The top-k of every query, the scores computed a tile at a time by `score(rows, cols, out)`
    (queries `rows`, entries `cols`, fp32 [b, rows, cols] written into `out`), only where a tile's
    queries can see; entry ids [b, s, k] int32. Shared by this reference and the int8 route, so both
    fill the same tiles in the same order (the tile size changes the work's grouping, never a score
    or a pick: each score is computed alone, and `top_entries` depends only on the scores)."""
    picks = torch.full((b, s, k), -1, dtype=torch.int32, device=device)
    if k == 0 or s == 0:
        return picks
    tile, chunk, group = tile_sizes(b, s, hi, n_keys, query_block, score_tile)
    for g in range(0, s, group):
        seen = visible[:, g:g + group].long()  # [b, n]
        n_cols = int(seen.max())  # no query of the group sees past this entry
        if n_cols == 0:
            continue
        # Rows of a tile are written up to the tile's own last visible entry; the rest stay
        # unwritten and are hidden by `top_entries`, since no query of that tile sees them.
        # Columns padded to a multiple of 8 (hidden like the rest) for `best_values`' chunks.
        scores = torch.empty(b, seen.size(1), -(-n_cols // 8) * 8, device=device)
        for start in range(g, min(s, g + group), tile):
            rows = slice(start - g, start - g + tile)
            width = int(seen[:, rows].max())
            for c in range(0, width, chunk):
                cols = slice(c, min(width, c + chunk))
                score(slice(start, start + tile), cols, scores[:, rows, cols])
        chosen = min(k, n_cols)
        picks[:, g:g + group, :chosen] = top_entries(scores, seen, chosen)
    return picks
