"""shardoptim: torch.optim's algorithms on flat buckets, sharded across ranks when asked."""

from . import amp, checkpoint, ema, sched
from .algorithms import (
    ASGD, LBFGS, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, RAdam, RMSprop, Rprop, SparseAdam,
)
from .core import Optimizer, ShardingConfig

__all__ = [
    "SGD", "Adam", "AdamW", "Adadelta", "Adagrad", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop",
    "LBFGS", "SparseAdam", "Optimizer", "ShardingConfig", "amp", "checkpoint", "ema", "sched",
]
__version__ = "0.1.0"
