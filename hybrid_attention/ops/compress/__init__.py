from .api import compress
from .reference import compress_reference

__all__ = ["compress", "compress_reference"]
