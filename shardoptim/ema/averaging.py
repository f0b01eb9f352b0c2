"""Averaging rules: equal-weight (SWA) and exponential (EMA), for one tensor or for a list of tensors.

The ``*_avg_fn`` factories return ``fn(averaged, current, num_averaged) -> Tensor``, the new average of
one tensor. The ``*_multi_avg_fn`` factories return ``fn(averaged, current, num_averaged) -> None``,
which updates a list of averaged tensors in place from a list of current ones (all on one device,
of one dtype). ``num_averaged`` is how many values the average already holds (an int or a 0-D
tensor). Numbers follow ``torch.optim.swa_utils`` exactly: floating-point and complex lists use one
``lerp`` per list, integer tensors the textbook formulas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

AvgFn = Callable[[Tensor, Tensor, "Tensor | int"], Tensor]
MultiAvgFn = Callable[[Sequence[Tensor], Sequence[Tensor], "Tensor | int"], None]


def check_decay(decay: float) -> None:
    """Raise ``ValueError`` unless ``0 <= decay <= 1``."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")


def _lerp_supported(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def get_ema_avg_fn(decay: float = 0.999) -> AvgFn:
    """EMA of one tensor: ``decay * averaged + (1 - decay) * current``. ``decay`` must be in [0, 1]."""
    check_decay(decay)

    @torch.no_grad()
    def ema(averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        return decay * averaged + (1 - decay) * current

    return ema


def get_swa_avg_fn() -> AvgFn:
    """Running mean of one tensor: ``averaged + (current - averaged) / (num_averaged + 1)``."""

    @torch.no_grad()
    def swa(averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        return averaged + (current - averaged) / (num_averaged + 1)

    return swa


def get_ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    """EMA of a tensor list, in place: ``averaged <- lerp(averaged, current, 1 - decay)``.

    ``decay`` must be in [0, 1]. The first average is the model itself: ``AveragedModel`` copies the
    weights on its first update and calls this function from the second one on.
    """
    check_decay(decay)
    weight = 1 - decay

    @torch.no_grad()
    def ema(averaged: Sequence[Tensor], current: Sequence[Tensor], num_averaged: Tensor | int) -> None:
        if _lerp_supported(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
            return
        for avg, cur in zip(averaged, current, strict=True):
            avg.copy_(avg * decay + cur * weight)

    return ema


def get_swa_multi_avg_fn() -> MultiAvgFn:
    """Running mean of a tensor list, in place: ``averaged <- lerp(averaged, current, 1 / (num_averaged + 1))``."""

    @torch.no_grad()
    def swa(averaged: Sequence[Tensor], current: Sequence[Tensor], num_averaged: Tensor | int) -> None:
        if _lerp_supported(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 / (num_averaged + 1))
            return
        differences = torch._foreach_sub(current, averaged)
        if isinstance(num_averaged, Tensor):
            divisors = [num_averaged + 1] * len(averaged)
            torch._foreach_addcdiv_(averaged, differences, divisors)
        else:
            torch._foreach_add_(averaged, differences, alpha=1.0 / (num_averaged + 1))

    return swa
