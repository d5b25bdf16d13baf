from .api import indexer_loss
from .reference import indexer_loss_reference

__all__ = ["indexer_loss", "indexer_loss_reference"]
