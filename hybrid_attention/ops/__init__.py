"""Attention ops: one folder per op, a public function that validates and dispatches by backend
("torch" everywhere, "triton" for the fused kernels, "auto" = Triton on CUDA tensors)."""

from .compress import compress
from .indexer_topk import FP4Keys, indexer_topk
from .sparse_attention import FP8KV, sparse_attention

__all__ = ["FP4Keys", "FP8KV", "compress", "indexer_topk", "sparse_attention"]
