from .api import sparse_attention
from .common import FP8KV

__all__ = ["FP8KV", "sparse_attention"]
