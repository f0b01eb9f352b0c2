"""Learning-rate schedulers with torch.optim.lr_scheduler's names, arguments and behaviour.

Every class is a subclass of torch's ``LRScheduler`` (``ReduceLROnPlateau`` of torch's
``ReduceLROnPlateau`` too), so trainers' isinstance checks accept them. They drive any object with
``param_groups`` (torch's optimizers and ours, sharded or not) and keep their state as JSON-ready
data. ``EPOCH_DEPRECATION_WARNING`` is torch's constant, as in ``torch.optim.lr_scheduler``.
"""

from torch.optim.lr_scheduler import EPOCH_DEPRECATION_WARNING as EPOCH_DEPRECATION_WARNING

from .base import LRScheduler
from .closed_form import (
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    MultiStepLR,
    PolynomialLR,
    StepLR,
)
from .composite import ChainedScheduler, SequentialLR
from .cyclic import CosineAnnealingWarmRestarts, CyclicLR, OneCycleLR
from .lambdas import LambdaLR, MultiplicativeLR
from .plateau import ReduceLROnPlateau

__all__ = [
    "ChainedScheduler",
    "ConstantLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "ExponentialLR",
    "LRScheduler",
    "LambdaLR",
    "LinearLR",
    "MultiStepLR",
    "MultiplicativeLR",
    "OneCycleLR",
    "PolynomialLR",
    "ReduceLROnPlateau",
    "SequentialLR",
    "StepLR",
]
