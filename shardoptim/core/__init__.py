"""The runtime every algorithm stands on: flat bucket layout and storage, the update-rule contract,
implementation dispatch, gradient synchronisation, communication, and the torch.optim-compatible
``Optimizer`` base."""

from .bucket import FlatBucket
from .comm import Comm, LocalComm
from .config import ShardingConfig
from .dispatch import Implementation
from .hparams import Check
from .layout import ALIGNMENT, BucketLayout, ParamSpec, Segment, Slot, plan_buckets
from .memory import MemoryReport, RankMemory
from .optimizer import Optimizer
from .reshard import Copy, Piece, owned_pieces, plan_copies
from .rule import HyperParams, UpdateRule
from .tensorlist import TensorList

__all__ = [
    "ALIGNMENT", "BucketLayout", "Check", "Comm", "Copy", "FlatBucket", "HyperParams", "Implementation",
    "LocalComm", "MemoryReport", "Optimizer", "ParamSpec", "Piece", "RankMemory", "Segment", "ShardingConfig",
    "Slot", "TensorList", "UpdateRule", "owned_pieces", "plan_buckets", "plan_copies",
]
