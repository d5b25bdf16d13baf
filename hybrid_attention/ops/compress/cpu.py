"""The fast torch backend of `compress`: the pooling a chunk of blocks at a time, forward and
backward, as a `torch.autograd.Function`.

Through plain autograd, the reference keeps its slot tensors, the softmax weights and their
gradients at the length of the sequence (several [s, 2d] fp32 tensors for a CSA layer). Here
forward keeps only its inputs and the entries; backward recomputes each chunk's softmax and, per
entry e, feature f and slot j with weights p and values v:

    d v_jf     = p_jf * dE_f
    d score_jf = p_jf * (v_jf - E_f) * dE_f           (softmax backward; E = sum_j p_jf v_jf)

With overlap the slots of entry i are block i-1 through features [0, d) and block i through
features [d, 2d): a token's first half feeds only the next block's entry, its second half only its
own block's, so every row of the gradients is written once (no accumulation). The `previous` block
before entry 0 is a constant and gets no gradient; ape's gradient is the sum of the score gradient
over the blocks, by slot.
"""

from __future__ import annotations

import torch

from ..autocast import without_autocast
from .reference import empty_previous, overlap_slots

# Blocks per chunk: a CSA chunk's slot tensors [b, 512, 2 * 4, 128] fp32 are 2 MB each.
CHUNK_BLOCKS = 512


def _chunk_slots(kv, score, ape, ratio, overlap, previous, i0, i1):
    """Values and logits [b, m, slots, d] fp32 of entries i0 .. i1 - 1."""
    lo = i0 - 1 if overlap and i0 > 0 else i0  # with overlap, the block before the chunk too
    blocks_kv = kv[:, lo * ratio:i1 * ratio].float().unflatten(1, (i1 - lo, ratio))  # [b, m(+1), r, w]
    blocks_score = score[:, lo * ratio:i1 * ratio].float().unflatten(1, (i1 - lo, ratio))
    if ape is not None:
        blocks_score = blocks_score + ape.float()
    if not overlap:
        return blocks_kv, blocks_score
    d = kv.size(-1) // 2
    if lo == i0:  # the chunk starts the sequence: the block before it is `previous`
        before_kv, before_score = previous
    else:
        before_kv, before_score = blocks_kv[:, 0], blocks_score[:, 0]
        blocks_kv, blocks_score = blocks_kv[:, 1:], blocks_score[:, 1:]
    return (overlap_slots(blocks_kv, before_kv.float(), d),
            overlap_slots(blocks_score, before_score.float(), d))


class Compress(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, kv, score, ape, ratio, overlap, previous_kv, previous_score):
        b, s, width = kv.shape
        n = s // ratio
        previous = (previous_kv, previous_score)
        out = kv.new_empty(b, n, width // 2 if overlap else width, dtype=torch.float32)
        for i0 in range(0, n, CHUNK_BLOCKS):
            i1 = min(n, i0 + CHUNK_BLOCKS)
            values, logits = _chunk_slots(kv, score, ape, ratio, overlap, previous, i0, i1)
            out[:, i0:i1] = logits.softmax(dim=-2).mul_(values).sum(dim=-2)
        ctx.save_for_backward(kv, score, ape, previous_kv, previous_score, out)
        ctx.ratio, ctx.overlap = ratio, overlap
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad):
        kv, score, ape, previous_kv, previous_score, out = ctx.saved_tensors
        ratio, overlap = ctx.ratio, ctx.overlap
        b, s, width = kv.shape
        n = out.size(1)
        d = width // 2 if overlap else width
        dkv = torch.zeros(b, s, width, dtype=torch.float32, device=kv.device)
        dscore = torch.zeros_like(dkv)
        grad, previous = grad.float(), (previous_kv, previous_score)
        for i0 in range(0, n, CHUNK_BLOCKS):
            i1 = min(n, i0 + CHUNK_BLOCKS)
            values, logits = _chunk_slots(kv, score, ape, ratio, overlap, previous, i0, i1)
            p = logits.softmax(dim=-2)  # [b, m, slots, d]
            de = grad[:, i0:i1, None]  # [b, m, 1, d]
            dv = p * de
            ds = dv * (values - out[:, i0:i1, None])
            rows = slice(i0 * ratio, i1 * ratio)
            if not overlap:
                dkv[:, rows] = dv.flatten(1, 2)
                dscore[:, rows] = ds.flatten(1, 2)
                continue
            # Slots [r, 2r): block i's own tokens, features [d, 2d).
            dkv[:, rows, d:] = dv[:, :, ratio:].flatten(1, 2)
            dscore[:, rows, d:] = ds[:, :, ratio:].flatten(1, 2)
            # Slots [0, r): block i - 1's tokens, features [0, d); entry 0's are `previous` (constant).
            first = 1 if i0 == 0 else 0
            before = slice((i0 + first - 1) * ratio, (i1 - 1) * ratio)
            dkv[:, before, :d] = dv[:, first:, :ratio].flatten(1, 2)
            dscore[:, before, :d] = ds[:, first:, :ratio].flatten(1, 2)
        dape = None
        if ape is not None and ctx.needs_input_grad[2]:
            # Row t's slot is t % ratio; rows past the last complete block have a zero gradient.
            dape = dscore[:, :n * ratio].unflatten(1, (n, ratio)).sum((0, 1)).to(ape.dtype)
        return (dkv.to(kv.dtype) if ctx.needs_input_grad[0] else None,
                dscore.to(score.dtype) if ctx.needs_input_grad[1] else None,
                dape, None, None, None, None)


def compress_cpu(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor | None, ratio: int, overlap: bool,
                 previous: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`compress` (same arguments, same result as `compress_reference`) a chunk at a time."""
    if overlap and previous is None:
        previous = empty_previous(kv, ratio)
    previous_kv, previous_score = previous if overlap else (None, None)
    return Compress.apply(kv, score, ape, ratio, overlap, previous_kv, previous_score)
