"""Backend choice shared by every op: "auto" takes Triton for CUDA tensors and torch otherwise."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, like: torch.Tensor) -> str:
    match backend:
        case "auto":
            return "triton" if like.is_cuda else "torch"
        case "torch" | "triton":
            return backend
        case _:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
