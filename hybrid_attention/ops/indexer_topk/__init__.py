from .api import indexer_topk
from .common import FP4Keys

__all__ = ["FP4Keys", "indexer_topk"]
