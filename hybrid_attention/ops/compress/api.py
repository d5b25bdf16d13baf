"""compress(kv, score, ape, ratio, overlap): the compressor's softmax-gated pooling of blocks of tokens."""

from __future__ import annotations

import torch

from ..dispatch import resolve_backend
from .reference import compress_reference


def compress(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool,
             previous: tuple[torch.Tensor, torch.Tensor] | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Pool every complete block of `ratio` tokens into one entry (SPEC 5.2): [b, s // ratio, d] fp32.

    kv [b, s, c*d] projected values and score [b, s, c*d] gate scores of tokens that start at a block
    boundary (c = 2 with overlap, else 1), ape [ratio, c*d] the per-slot bias added to the scores.
    Entry i is, per feature, the softmax over its slots of score + ape weighting kv. With overlap
    its slots are the previous block through features [0, d) and block i through features [d, 2d);
    before entry 0 the previous block is `previous` = (kv, score with ape already added), each
    [b, ratio, 2d], as the compressor state holds it, or empty (a fresh sequence). Tokens after the
    last complete block are ignored (they wait in the compressor state).

    backend: "torch", "triton" or "auto" (Triton for CUDA tensors, else torch). Differentiable in
    kv, score and ape; `previous` is a constant.
    """
    if not torch.compiler.is_compiling():
        _validate(kv, score, ape, ratio, overlap, previous)
    if previous is not None:
        previous = (previous[0].detach(), previous[1].detach())
    backend = resolve_backend(backend, kv)
    if backend == "triton":
        from .triton import compress_triton

        return compress_triton(kv, score, ape, ratio, overlap, previous)
    return compress_reference(kv, score, ape, ratio, overlap, previous)


def _validate(kv, score, ape, ratio, overlap, previous) -> None:
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    if kv.dim() != 3 or not kv.is_floating_point():
        raise ValueError(f"kv must be a float [batch, seq, width] tensor, got {kv.dtype} {tuple(kv.shape)}")
    b, s, width = kv.shape
    if overlap and width % 2:
        raise ValueError(f"with overlap kv holds two halves of d features, got an odd width {width}")
    if score.shape != kv.shape:
        raise ValueError(f"score must be [{b}, {s}, {width}] like kv, got shape {tuple(score.shape)}")
    if ape.shape != (ratio, width):
        raise ValueError(f"ape must be [{ratio}, {width}] (ratio, width), got shape {tuple(ape.shape)}")
    if previous is not None:
        if not overlap:
            raise ValueError("previous is the block before the first entry, used only with overlap")
        for name, part in zip(("kv", "score"), previous, strict=True):
            if part.shape != (b, ratio, width):
                raise ValueError(f"previous {name} must be [{b}, {ratio}, {width}], got shape "
                                 f"{tuple(part.shape)}")
