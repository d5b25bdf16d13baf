"""hybrid_attention: DeepSeek-V4 hybrid attention (CSA, HCA, sliding window, sink) in PyTorch."""

from .attention import HybridAttention
from .config import AttentionConfig, ModelConfig
from .model import HybridTransformer
from .state import LayerState
from .train import load_checkpoint

__all__ = ["AttentionConfig", "HybridAttention", "HybridTransformer", "LayerState", "ModelConfig",
           "load_checkpoint"]
__version__ = "0.1.0"
