"""shardoptim: torch.optim's algorithms on flat buckets, sharded across ranks when asked."""

from .algorithms import SGD, Adam, AdamW
from .core import Optimizer

__all__ = ["SGD", "Adam", "AdamW", "Optimizer"]
__version__ = "0.1.0"
