"""Schedulers made of schedulers: ``ChainedScheduler`` (all at once) and ``SequentialLR`` (one after
another)."""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau

from .base import LRScheduler
from .groups import group_values, set_group_value


def _check_children(owner: str, schedulers: Sequence[Any], optimizer: Any) -> None:
    if len(schedulers) < 1:
        raise ValueError(f"{owner} expects at least one scheduler, but got none")
    for index, scheduler in enumerate(schedulers):
        if not hasattr(scheduler, "optimizer"):
            raise TypeError(f"{owner}: the scheduler at index {index} has no `optimizer` attribute")
        # Ours is a subclass of torch's: one check refuses both.
        if isinstance(scheduler, ReduceLROnPlateau):
            raise ValueError(
                f"{owner} does not support ReduceLROnPlateau (index {index}): its step() needs a metric"
            )
        if scheduler.optimizer is not optimizer:
            raise ValueError(
                f"{owner} expects all schedulers to belong to the same optimizer, but the "
                f"{type(scheduler).__name__} at index {index} drives another one"
            )


class _Composite(LRScheduler):
    """State handling shared by the composites: each child's state dict sits in ``_schedulers``."""

    _not_state = LRScheduler._not_state | {"_schedulers"}
    _schedulers: list[Any]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["_schedulers"] = [scheduler.state_dict() for scheduler in self._schedulers]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "_schedulers"})
        children = state_dict.get("_schedulers", ())
        if len(children) != len(self._schedulers):
            raise ValueError(
                f"{type(self).__name__}: the state holds {len(children)} schedulers, this one has "
                f"{len(self._schedulers)}"
            )
        for scheduler, state in zip(self._schedulers, children, strict=True):
            scheduler.load_state_dict(state)


class ChainedScheduler(_Composite):
    """Step several schedulers of one optimizer together: ``step()`` steps each in order, so each
    applies its change to the lr the previous one left.

    Args:
        schedulers: the schedulers, all driving the same optimizer; ReduceLROnPlateau is refused.
        optimizer: that optimizer; by default the first scheduler's.
    """

    def __init__(self, schedulers: Sequence[LRScheduler], optimizer: Any | None = None) -> None:
        if optimizer is None and len(schedulers) > 0:
            optimizer = getattr(schedulers[0], "optimizer", None)
        _check_children(type(self).__name__, schedulers, optimizer)
        self._schedulers = list(schedulers)
        self.optimizer = optimizer
        self._last_lr = group_values(optimizer, "lr")

    def step(self) -> None:  # type: ignore[override]
        """Step every scheduler, in order."""
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = group_values(self.optimizer, "lr")


class SequentialLR(_Composite):
    """Hand the optimizer from one scheduler to the next at given epochs.

    Scheduler ``i`` runs from ``milestones[i - 1]`` (0 for the first) until ``milestones[i]``.
    Construction puts every group back at its ``initial_lr``, takes back the constructor step of
    every scheduler inside, and restarts the first one. At each milestone the incoming scheduler
    starts over at its own epoch 0, from its closed form where it has one.

    Args:
        optimizer: the optimizer all schedulers drive.
        schedulers: the schedulers, in order; ReduceLROnPlateau is refused.
        milestones: the epochs of the hand-overs, one fewer than the schedulers, non-decreasing.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    def __init__(
        self, optimizer: Any, schedulers: list[LRScheduler], milestones: list[int], last_epoch: int = -1
    ) -> None:
        _check_children(type(self).__name__, schedulers, optimizer)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                f"SequentialLR expects one milestone fewer than schedulers, got {len(schedulers)} "
                f"schedulers and {len(milestones)} milestones"
            )
        if any(later < earlier for earlier, later in itertools.pairwise(milestones)):
            raise ValueError(f"SequentialLR expects non-decreasing milestones, got {list(milestones)}")
        self._schedulers = list(schedulers)
        self._milestones = list(milestones)
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            set_group_value(group, "lr", group["initial_lr"])
        self.recursive_undo()
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def recursive_undo(self, sched: Any | None = None) -> None:
        """Take back one step of ``sched`` (by default this scheduler), of every scheduler inside."""
        target = self if sched is None else sched
        children = getattr(target, "_schedulers", None)
        if children is not None:
            for child in children:
                self.recursive_undo(child)
        elif hasattr(target, "last_epoch"):
            target.last_epoch -= 1

    def step(self) -> None:  # type: ignore[override]
        """Step the scheduler in charge of the next epoch (restarting it at its milestone)."""
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()
