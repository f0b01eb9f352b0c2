"""shardoptim: torch.optim's algorithms on flat buckets, sharded across ranks when asked."""

from . import amp, checkpoint, ema, sched
from .algorithms import (
    ASGD, LBFGS, SGD, Adadelta, Adafactor, Adagrad, Adam, Adamax, AdamW, Muon, MuonAdamW, NAdam, RAdam, RMSprop,
    Rprop, SparseAdam, muon_param_groups,
)
from .core import Optimizer, ShardingConfig

__all__ = [
    "SGD", "Adam", "AdamW", "Adadelta", "Adagrad", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop",
    "LBFGS", "SparseAdam", "Adafactor", "Muon", "MuonAdamW", "muon_param_groups", "Optimizer", "ShardingConfig", "amp", "checkpoint", "ema", "sched",
]
__version__ = "0.1.0"
