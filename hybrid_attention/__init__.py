"""hybrid_attention: DeepSeek-V4 hybrid attention (CSA, HCA, sliding window, sink) in PyTorch."""

from .attention import HybridAttention
from .config import AttentionConfig
from .state import LayerState

__all__ = ["AttentionConfig", "HybridAttention", "LayerState"]
__version__ = "0.1.0"
