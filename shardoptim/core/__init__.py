"""The runtime every algorithm stands on: flat bucket layout and storage, the update-rule contract,
implementation dispatch, communication, and the torch.optim-compatible ``Optimizer`` base."""

from .bucket import FlatBucket
from .comm import Comm, LocalComm
from .dispatch import Implementation
from .hparams import Check
from .layout import ALIGNMENT, BucketLayout, ParamSpec, Segment, Slot, plan_buckets
from .optimizer import Optimizer
from .rule import GroupView, UpdateRule
from .tensorlist import TensorList

__all__ = [
    "ALIGNMENT", "BucketLayout", "Check", "Comm", "FlatBucket", "GroupView", "Implementation", "LocalComm",
    "Optimizer", "ParamSpec", "Segment", "Slot", "TensorList", "UpdateRule", "plan_buckets",
]
