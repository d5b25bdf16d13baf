from .api import compress

__all__ = ["compress"]
