"""Backend choice shared by every op: "auto" takes Triton for CUDA tensors when Triton is installed,
and the torch path otherwise."""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

BACKENDS = ("auto", "torch", "triton")


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs its kernels in an interpreter on CPU tensors (the tests do)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_usable(like: torch.Tensor | None = None) -> None:
    """Raise a ValueError saying why backend="triton" cannot run (on `like`'s device, if given)."""
    if not triton_available():
        raise ValueError('backend="triton" needs the triton package, which is not installed; '
                         'use backend="torch" or backend="auto"')
    if like is not None and not like.is_cuda and not interpreting():
        raise ValueError(f'backend="triton" runs on CUDA tensors, got a tensor on {like.device}; use '
                         'backend="torch" or backend="auto" (or set TRITON_INTERPRET=1 to run the '
                         "kernels in Triton's interpreter, slowly)")


def resolve_backend(backend: str, like: torch.Tensor) -> str:
    match backend:
        case "auto":
            return "triton" if like.is_cuda and triton_available() else "torch"
        case "torch":
            return backend
        case "triton":
            check_triton_usable(like)
            return backend
        case _:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
