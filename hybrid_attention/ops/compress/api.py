"""compress(kv, score, ape, ratio, overlap): the compressor's softmax-gated pooling of blocks of tokens."""

from __future__ import annotations

import torch

from ...checks import check_bool, check_int, check_same_device, check_tensor
from ..dispatch import resolve_backend
from .cpu import compress_cpu


def compress(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor | None, ratio: int, overlap: bool,
             previous: tuple[torch.Tensor, torch.Tensor] | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Pool every complete block of `ratio` tokens into one entry (SPEC 5.2): [b, s // ratio, d] fp32.

    kv [b, s, c*d] projected values and score [b, s, c*d] gate scores of tokens that start at a block
    boundary (c = 2 with overlap, else 1), ape [ratio, c*d] the per-slot bias added to the scores
    (None: the scores include it already, as the compressor's own, and its state's, do).
    Entry i is, per feature, the softmax over its slots of score + ape weighting kv. With overlap
    its slots are the previous block through features [0, d) and block i through features [d, 2d);
    before entry 0 the previous block is `previous` = (kv, score with ape already added), each
    [b, ratio, 2d], as the compressor state holds it, or empty (a fresh sequence). Tokens after the
    last complete block are ignored (they wait in the compressor state).

    backend: "torch" (`cpu.py`: a chunk of blocks at a time, forward and backward), "triton" or
    "auto" (Triton for CUDA tensors, else torch). Differentiable in kv, score and ape; `previous`
    is a constant. `reference.py` is the oracle of both.
    """
    if not torch.compiler.is_compiling():
        _validate(kv, score, ape, ratio, overlap, previous)
    if previous is not None:
        previous = (previous[0].detach(), previous[1].detach())
    backend = resolve_backend(backend, kv)
    if backend == "triton":
        from .triton import compress_triton

        return compress_triton(kv, score, ape, ratio, overlap, previous)
    return compress_cpu(kv, score, ape, ratio, overlap, previous)


def _validate(kv, score, ape, ratio, overlap, previous) -> None:
    for name, value in (("kv", kv), ("score", score)):
        check_tensor(name, value)
    check_int("ratio", ratio, 1)
    check_bool("overlap", overlap)
    if kv.dim() != 3 or not kv.is_floating_point():
        raise ValueError(f"kv must be a float [batch, seq, width] tensor, got {kv.dtype} {tuple(kv.shape)}")
    b, s, width = kv.shape
    if overlap and width % 2:
        raise ValueError(f"with overlap kv holds two halves of d features, got an odd width {width}")
    if score.shape != kv.shape or not score.is_floating_point():
        raise ValueError(f"score must be a float [{b}, {s}, {width}] tensor like kv, got {score.dtype} "
                         f"{tuple(score.shape)}")
    if ape is not None:
        check_tensor("ape", ape)
        if ape.shape != (ratio, width) or not ape.is_floating_point():
            raise ValueError(f"ape must be a float [{ratio}, {width}] (ratio, width) tensor, got "
                             f"{ape.dtype} {tuple(ape.shape)}")
    check_same_device(kv=kv, score=score, ape=ape)
    if previous is not None:
        if not overlap:
            raise ValueError("previous is the block before the first entry, used only with overlap")
        if not isinstance(previous, tuple | list) or len(previous) != 2:
            raise TypeError(f"previous must be a (kv, score) pair of tensors, got {type(previous).__name__}")
        for name, part in zip(("kv", "score"), previous, strict=True):
            check_tensor(f"previous {name}", part)
            if part.shape != (b, ratio, width) or not part.is_floating_point():
                raise ValueError(f"previous {name} must be a float [{b}, {ratio}, {width}] tensor, got "
                                 f"{part.dtype} {tuple(part.shape)}")
            check_same_device(kv=kv, **{f"previous {name}": part})
