"""Backend choice shared by every op: "auto" takes Triton for CUDA tensors when Triton is installed,
and the torch path otherwise."""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

BACKENDS = ("auto", "torch", "triton")


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, like: torch.Tensor) -> str:
    match backend:
        case "auto":
            return "triton" if like.is_cuda and triton_available() else "torch"
        case "torch" | "triton":
            return backend
        case _:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
