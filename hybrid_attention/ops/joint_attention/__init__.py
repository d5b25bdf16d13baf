from .api import joint_attention
from .reference import joint_attention_reference, joint_index_lists

__all__ = ["joint_attention", "joint_attention_reference", "joint_index_lists"]
