"""Readable torch reference of the lightning indexer's scoring and top-k (SPEC.md section 6, with the
deterministic ties of section 12): the oracle, and the CPU path.

For query (b, t) and entry i < visible[b, t]:
    I[t, i] = sum_h w[t, h] * relu(q[t, h] . K[i])   (per-head products rounded to q.dtype, the
                                                       sum over heads in fp32, rounded once)
    picks   = the k entries with the largest I, ties to the lower entry index, in ascending order
    -1 fills the list when the query sees fewer than k entries.

Queries are scored a block at a time against only the entries the block can see, so memory stays
[block, entries], never [queries, entries] (SPEC 9, limitation 1). The scores are those of
`indexer.index_scores` (same GEMMs, same roundings) computed in place, and the top-k with ties to
the lower id is one `torch.topk` over packed (score, id) keys (`common.pack_scores`), which picks
the same set as `indexer.topk_lowest_index_ties` without its sort-free but memory-heavy cumsum.
"""

from __future__ import annotations

import torch

from .common import EMPTY_KEY, FP4Keys, pack_scores, unpack_entries

# Largest [b, block, entries] score matrix of one query block, in elements.
SCORE_BUDGET = 1 << 24


def block_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [b, n, hi, di], weights [b, n, hi], keys [b, t, di] -> fp32 [b, n, t], the values of
    `indexer.index_scores`: per-head products rounded to q.dtype, summed over heads in fp32."""
    total = torch.zeros(*q.shape[:2], keys.size(1), device=q.device, dtype=torch.float32)
    for h in range(q.size(2)):
        head = q[:, :, h] @ keys.transpose(1, 2)  # [b, n, t] in q.dtype
        total += head.clamp_min_(0).mul_(weights[:, :, h, None])  # relu, weight, in q.dtype
    return total.to(q.dtype).float()


def indexer_topk_reference(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor | FP4Keys, k: int,
                           visible: torch.Tensor, query_block: int | None = None) -> torch.Tensor:
    """q [b, s, hi, di], weights [b, s, hi], keys [b, t, di] (or FP4Keys), visible [b, s] (entries
    each query may see, <= t) -> entry ids [b, s, k] int32."""
    if isinstance(keys, FP4Keys):
        keys = keys.dequantize(q.dtype)  # every key is read once per call
    b, s = q.shape[:2]
    picks = torch.full((b, s, k), -1, dtype=torch.int32, device=q.device)
    if k == 0 or s == 0:
        return picks
    block = query_block or max(1, SCORE_BUDGET // max(1, b * keys.size(1)))
    for start in range(0, s, block):
        seen = visible[:, start:start + block, None].long()  # [b, n, 1]
        n_cols = int(seen.max())  # no query of the block sees past this entry
        if n_cols == 0:
            continue
        scores = block_scores(q[:, start:start + block], weights[:, start:start + block], keys[:, :n_cols])
        entry = torch.arange(n_cols, device=q.device)
        packed = pack_scores(scores, entry).masked_fill_(entry >= seen, EMPTY_KEY)  # [b, n, n_cols]
        best = packed.topk(min(k, n_cols), dim=-1, sorted=False).values
        # Ascending ids; a query that sees fewer than k entries also took hidden ones: make them -1.
        ids = torch.where(best == EMPTY_KEY, n_cols, unpack_entries(best)).sort(dim=-1).values
        picks[:, start:start + block, :best.size(-1)] = ids.masked_fill(ids == n_cols, -1).to(torch.int32)
    return picks
