"""Schedules written once as a factor of the epoch, stepped chainably.

Each schedule here is a factor ``f(t)`` of the epoch ``t``; its closed form is

    lr(t) = floor + (base_lr - floor) * f(t)

(``floor`` is 0 except for cosine annealing's ``eta_min``). ``step()`` does not use it directly:
it applies the chainable form derived from it to whatever lr the group holds now,

    lr_t = floor + (lr_{t-1} - floor) * f(t) / f(t-1),        with f(-1) = 1,

so schedulers stepping the same optimizer compose (each acts on the lr the previous one left).
Where ``f(t) == f(t-1)`` the lr is left untouched. Where ``f(t-1) == 0`` the ratio is undefined and
the step adds the closed form's increment ``(base_lr - floor) * (f(t) - f(t-1))`` instead. The
deprecated ``step(epoch)`` and ``SequentialLR``'s restarts use the closed form.

A subclass gives ``f`` and may evaluate the ratio or the increment in an algebraically equal form:
``LinearLR`` and ``CosineAnnealingLR`` use the form torch's recursive step evaluates, because the
plain quotient differs from it in the last bits and, stepped tens of thousands of times, drifts
past 1e-12 relative. The geometric schedules multiply by exactly ``gamma`` per decay.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from .base import LRScheduler
from .groups import group_values


def cosine_weight(step: float, period: float) -> float:
    """``(1 + cos(pi * step / period)) / 2``: 1 at ``step = 0``, 0 at ``step = period``."""
    return (1 + math.cos(math.pi * step / period)) / 2


def _require_positive(owner: str, name: str, value: Any) -> None:
    if not value > 0:
        raise ValueError(f"{owner}: {name} must be positive, got {value}")


class _FactorSchedule(LRScheduler):
    """A schedule given by its factor ``f(t)``; see the module docstring for the two forms."""

    # torch leaves the lr alone when a schedule is resumed (last_epoch >= 0 at construction) for
    # the smooth schedules, but applies the piecewise ones' change at the resumed epoch; same here.
    _resume_keeps_lr: ClassVar[bool] = False

    def _factor(self, epoch: int) -> float:
        raise NotImplementedError

    def _floor(self) -> float:
        return 0.0

    def _ratio(self, epoch: int, before: float, after: float) -> float:
        """``f(epoch) / f(epoch - 1)`` for ``epoch >= 1``, given both (nonzero ``before``)."""
        return after / before

    def _rise_from_zero(self, epoch: int, after: float) -> float:
        """``f(epoch) - f(epoch - 1)`` where ``f(epoch - 1) == 0``."""
        return after

    def get_lr(self) -> list[Any]:
        self._warn_unless_inside_step()
        lrs = group_values(self.optimizer, "lr")
        epoch = self.last_epoch
        if self._is_initial and epoch > 0 and self._resume_keeps_lr:
            return lrs
        before = self._factor(epoch - 1) if epoch > 0 else 1.0
        after = self._factor(epoch)
        if after == before:
            return lrs
        floor = self._floor()
        if before == 0:
            rise = self._rise_from_zero(epoch, after)
            return [lr + (base - floor) * rise for lr, base in zip(lrs, self.base_lrs, strict=True)]
        ratio = self._ratio(epoch, before, after) if epoch > 0 else after
        return [floor + (lr - floor) * ratio for lr in lrs]

    def _get_closed_form_lr(self) -> list[Any]:
        floor = self._floor()
        factor = self._factor(self.last_epoch)
        return [floor + (base - floor) * factor for base in self.base_lrs]


class _GeometricDecay(_FactorSchedule):
    """``f(t) = gamma ** n(t)`` for a count ``n(t)`` of decays so far; each step multiplies by
    ``gamma ** (n(t) - n(t-1))``, exactly ``gamma`` per decay."""

    gamma: float

    def _decay_count(self, epoch: int) -> int:
        raise NotImplementedError

    def _factor(self, epoch: int) -> float:
        return self.gamma ** self._decay_count(epoch)

    def _ratio(self, epoch: int, before: float, after: float) -> float:
        return self.gamma ** (self._decay_count(epoch) - self._decay_count(epoch - 1))


class StepLR(_GeometricDecay):
    """Decay the lr by ``gamma`` every ``step_size`` epochs: ``f(t) = gamma ** (t // step_size)``.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        step_size: period of the decay, a positive integer.
        gamma: multiplicative decay. Default: 0.1.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    def __init__(self, optimizer: Any, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        if not step_size > 0 or step_size != int(step_size):
            raise ValueError(f"StepLR: step_size must be a positive integer, got {step_size}")
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def _decay_count(self, epoch: int) -> int:
        return epoch // self.step_size


def _milestone_counts(milestones: Any) -> Counter:
    """A Counter of milestones from a list of epochs, a mapping epoch -> count (JSON keys are
    strings) or a list of ``[epoch, count]`` pairs."""
    if isinstance(milestones, Mapping):
        return Counter({int(epoch): int(count) for epoch, count in milestones.items()})
    counts: Counter = Counter()
    for item in milestones:
        if isinstance(item, (list, tuple)):
            epoch, count = item
            counts[int(epoch)] += int(count)
        else:
            counts[item] += 1
    return counts


class MultiStepLR(_GeometricDecay):
    """Decay the lr by ``gamma`` at each milestone: ``f(t) = gamma ** (number of milestones <= t)``.

    A milestone listed k times decays by ``gamma ** k``. In ``state_dict()`` the milestones are a
    sorted list of ``[epoch, count]`` pairs; ``load_state_dict`` also takes torch's Counter.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        milestones: epochs at which to decay, in any order.
        gamma: multiplicative decay. Default: 0.1.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    def __init__(
        self, optimizer: Any, milestones: Iterable[int], gamma: float = 0.1, last_epoch: int = -1
    ) -> None:
        self.milestones = _milestone_counts(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def _decay_count(self, epoch: int) -> int:
        return sum(count for milestone, count in self.milestones.items() if milestone <= epoch)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["milestones"] = [[epoch, count] for epoch, count in sorted(self.milestones.items())]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "milestones"})
        if "milestones" in state_dict:
            self.milestones = _milestone_counts(state_dict["milestones"])


class ConstantLR(_FactorSchedule):
    """Scale the lr by ``factor`` for the first ``total_iters`` epochs:
    ``f(t) = factor`` for ``t < total_iters``, else 1.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        factor: scale during the first epochs, in [0, 1]. Default: 1/3.
        total_iters: number of scaled epochs. Default: 5.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    def __init__(
        self, optimizer: Any, factor: float = 1.0 / 3, total_iters: int = 5, last_epoch: int = -1
    ) -> None:
        if factor > 1.0 or factor < 0:
            raise ValueError(f"ConstantLR: factor must be between 0 and 1, got {factor}")
        if total_iters < 0:
            raise ValueError(f"ConstantLR: total_iters must be non-negative, got {total_iters}")
        self.factor = factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def _factor(self, epoch: int) -> float:
        return self.factor if epoch < self.total_iters else 1.0


class LinearLR(_FactorSchedule):
    """Move the lr's scale linearly from ``start_factor`` to ``end_factor`` over ``total_iters``
    epochs: ``f(t) = start_factor + (end_factor - start_factor) * min(t, total_iters) / total_iters``.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        start_factor: scale at epoch 0, in (0, 1]. Default: 1/3.
        end_factor: scale from ``total_iters`` on, in [0, 1]. Default: 1.0.
        total_iters: length of the ramp, positive. Default: 5.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    _resume_keeps_lr = True

    def __init__(
        self,
        optimizer: Any,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError(f"LinearLR: start_factor must be in (0, 1], got {start_factor}")
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError(f"LinearLR: end_factor must be in [0, 1], got {end_factor}")
        _require_positive("LinearLR", "total_iters", total_iters)
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def _factor(self, epoch: int) -> float:
        progress = min(self.total_iters, epoch)
        return self.start_factor + (self.end_factor - self.start_factor) * progress / self.total_iters

    def _ratio(self, epoch: int, before: float, after: float) -> float:
        # f(t) / f(t-1) = 1 + (f(t) - f(t-1)) / f(t-1), with 1 / total_iters cancelled. Evaluated
        # as torch does: the quotient of two factors drifts from it by ~4e-12 over the last 1,000
        # steps of a 100,000-step decay to 0.
        slope = self.end_factor - self.start_factor
        return 1.0 + slope / (self.total_iters * self.start_factor + (epoch - 1) * slope)


class ExponentialLR(_GeometricDecay):
    """Decay the lr by ``gamma`` every epoch: ``f(t) = gamma ** t``.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        gamma: multiplicative decay per epoch.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    _resume_keeps_lr = True

    def __init__(self, optimizer: Any, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def _decay_count(self, epoch: int) -> int:
        return epoch


class PolynomialLR(_FactorSchedule):
    """Decay the lr polynomially to 0 over ``total_iters`` epochs:
    ``f(t) = (1 - min(t, total_iters) / total_iters) ** power``.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        total_iters: epochs until the lr reaches 0, positive. Default: 5.
        power: exponent of the polynomial. Default: 1.0.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    _resume_keeps_lr = True

    def __init__(self, optimizer: Any, total_iters: int = 5, power: float = 1.0, last_epoch: int = -1) -> None:
        _require_positive("PolynomialLR", "total_iters", total_iters)
        self.total_iters = total_iters
        self.power = power
        super().__init__(optimizer, last_epoch)

    def _factor(self, epoch: int) -> float:
        return (1.0 - min(self.total_iters, epoch) / self.total_iters) ** self.power


class CosineAnnealingLR(_FactorSchedule):
    """Anneal the lr from its base to ``eta_min`` along a half cosine over ``T_max`` epochs, then
    back up (the cosine continues, without restarts): ``floor = eta_min`` and
    ``f(t) = (1 + cos(pi * t / T_max)) / 2``.

    The excess over ``eta_min`` vanishes at odd multiples of ``T_max``; the step after one adds
    ``(base_lr - eta_min) * (1 - cos(pi / T_max)) / 2``, the closed form's increment there.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        T_max: half-period in epochs, positive.
        eta_min: lowest lr. Default: 0.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    _resume_keeps_lr = True

    def __init__(self, optimizer: Any, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        _require_positive("CosineAnnealingLR", "T_max", T_max)
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def _factor(self, epoch: int) -> float:
        return cosine_weight(epoch, self.T_max)

    def _floor(self) -> float:
        return self.eta_min

    def _rise_from_zero(self, epoch: int, after: float) -> float:
        # Equal to ``after`` in exact arithmetic; ``after`` takes the cosine of a growing angle
        # (pi * epoch / T_max), whose rounding error grows with the epoch.
        return (1 - math.cos(math.pi / self.T_max)) / 2
