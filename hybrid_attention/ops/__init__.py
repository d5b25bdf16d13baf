"""Attention ops: one folder per op, a public function that validates and dispatches by backend."""

from .sparse_attention import sparse_attention

__all__ = ["sparse_attention"]
