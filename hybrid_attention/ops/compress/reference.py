"""Readable torch reference of the compressor's pooling (SPEC.md section 5.2): the oracle, and the
CPU path.

Entry i of a chunk that starts at a block boundary pools the tokens of block i (ratio r):
    logit[j, f] = score[i*r + j, f] + ape[j, f]
    e_i[f]      = sum_j softmax_j(logit[j, f]) * kv[i*r + j, f]      (fp32, per feature)
With overlap (CSA, width 2d) the softmax runs over 2r slots: the previous block's tokens through
features [0, d), then block i's tokens through features [d, 2d). Before entry 0 the previous block
comes from `previous` (the compressor state, ape already added) or is empty (logit -inf, value 0).
"""

from __future__ import annotations

import torch


def pool_blocks(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Softmax over the slot axis (-2) per feature, then the weighted sum: [.., slots, d] -> [.., d]."""
    weights = score.softmax(dim=-2)
    if torch.is_grad_enabled() and (kv.requires_grad or score.requires_grad):
        return (weights * kv).sum(dim=-2)  # autograd keeps the softmax output for its backward
    return weights.mul_(kv).sum(dim=-2)  # same values, one full-size temporary fewer


def overlap_slots(blocks: torch.Tensor, previous: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[b, n, r, 2d] blocks and the block before the first [b, r, 2d] -> [b, n, 2r, d] slots.

    Entry i uses features [0, d) of block i-1 (its "previous" half) followed by features [d, 2d)
    of block i (its "current" half), SPEC 5.2. Written into one new tensor (no concatenations:
    at prefill these are full-sequence copies).
    """
    b, n, r, _ = blocks.shape
    slots = blocks.new_empty(b, n, 2 * r, head_dim, dtype=torch.promote_types(blocks.dtype, previous.dtype))
    slots[:, :1, :r] = previous[:, None, :, :head_dim]
    slots[:, 1:, :r] = blocks[:, :-1, :, :head_dim]
    slots[:, :, r:] = blocks[..., head_dim:]
    return slots



def empty_previous(kv: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block before a fresh sequence's entry 0, [b, ratio, width] fp32: values 0, logits -inf."""
    b, width = kv.size(0), kv.size(-1)
    return (kv.new_zeros(b, ratio, width, dtype=torch.float32),
            kv.new_full((b, ratio, width), float("-inf"), dtype=torch.float32))


def compress_reference(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor | None, ratio: int,
                       overlap: bool, previous: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> torch.Tensor:
    """kv, score [b, s, c*d], ape [ratio, c*d] or None (score holds it already) -> entries
    [b, s // ratio, d] fp32 (c = 2 with overlap)."""
    b, s, width = kv.shape
    n = s // ratio
    blocks_kv = kv[:, :n * ratio].float().unflatten(1, (n, ratio))  # [b, n, r, c*d]
    blocks_score = score[:, :n * ratio].float().unflatten(1, (n, ratio))
    if ape is not None:
        blocks_score = blocks_score + ape.float()
    if not overlap:
        return pool_blocks(blocks_kv, blocks_score)
    if previous is None:
        previous = empty_previous(kv, ratio)
    head_dim = width // 2
    slots_kv = overlap_slots(blocks_kv, previous[0].float(), head_dim)  # [b, n, 2r, d]
    slots_score = overlap_slots(blocks_score, previous[1].float(), head_dim)
    return pool_blocks(slots_kv, slots_score)
