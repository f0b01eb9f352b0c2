"""``SWALR``: anneal every param group's learning rate to a constant SWA learning rate."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor

from ..sched.base import LRScheduler, require_initial_lrs
from ..sched.groups import detached_copy, require_param_groups

LR = float | Tensor

_STRATEGIES = ("cos", "linear")


def _annealed(strategy: str, t: float) -> float:
    """Fraction of the way from the starting lr to ``swa_lr`` at progress ``t`` in [0, 1]."""
    if strategy == "cos":
        return (1 - math.cos(math.pi * t)) / 2
    return t


def _clamp_unit(t: float) -> float:
    return max(0, min(1, t))


def _check_strategy(anneal_strategy: Any) -> None:
    if anneal_strategy not in _STRATEGIES:
        raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")


def _check_anneal_epochs(anneal_epochs: Any) -> None:
    if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
        raise ValueError(f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}")


def _swa_lrs(optimizer: Any, swa_lr: LR | Sequence[LR]) -> list[LR]:
    groups = optimizer.param_groups
    if isinstance(swa_lr, (list, tuple)):
        if len(swa_lr) != len(groups):
            raise ValueError(
                f"swa_lr must have the same length as optimizer.param_groups. "
                f"swa_lr has {len(swa_lr)} values, param_groups has {len(groups)}."
            )
        return [detached_copy(value) for value in swa_lr]
    return [detached_copy(swa_lr) for _ in groups]


class SWALR(LRScheduler):
    """Anneals each param group's learning rate to ``swa_lr`` in ``anneal_epochs`` steps, then holds it.

    Meant for the averaging phase of Stochastic Weight Averaging (see ``AveragedModel``). Each
    ``step()`` moves the lr a further fraction of the way from where the annealing started to
    ``group["swa_lr"]``, the fraction following half a cosine (``"cos"``) or a straight line
    (``"linear"``); after ``anneal_epochs`` steps the lr stays at ``swa_lr``. The annealing starts
    from whatever lr the group has when it begins, so SWALR can take over from another scheduler.

    Behaves as ``torch.optim.swa_utils.SWALR`` (same arguments, errors, learning rates bit for bit,
    warnings, ``initial_lr`` / ``last_epoch`` handling) and, like it, is a
    ``torch.optim.lr_scheduler.LRScheduler``: it is built on ``shardoptim.sched.LRScheduler``.
    ``state_dict()`` is plain JSON data under torch's key names, so either scheduler loads the
    other's; tensor learning rates are stored there as floats.

    Args:
        optimizer: any optimizer (an object with ``param_groups``), torch's or shardoptim's.
        swa_lr: the target lr, for all groups, or a list/tuple with one per group. Stored in each
            group as ``group["swa_lr"]``.
        anneal_epochs: steps the annealing takes, an ``int`` >= 0.
        anneal_strategy: ``"cos"`` or ``"linear"``.
        last_epoch: ``-1`` for a fresh start; otherwise the index of the last step when resuming,
            and every group must then have ``"initial_lr"``.
    """

    def __init__(
        self,
        optimizer: Any,
        swa_lr: LR | Sequence[LR],
        anneal_epochs: int = 10,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        last_epoch: int = -1,
    ) -> None:
        # Everything is checked before the groups get their swa_lr: a failed construction changes nothing.
        require_param_groups(optimizer)
        swa_lrs = _swa_lrs(optimizer, swa_lr)
        _check_strategy(anneal_strategy)
        _check_anneal_epochs(anneal_epochs)
        require_initial_lrs(optimizer, last_epoch)
        for group, value in zip(optimizer.param_groups, swa_lrs, strict=True):
            group["swa_lr"] = value
        self.anneal_epochs = anneal_epochs
        self._anneal_strategy: str = anneal_strategy
        super().__init__(optimizer, last_epoch)

    @property
    def anneal_strategy(self) -> str:
        """``"cos"`` or ``"linear"``."""
        return self._anneal_strategy

    def get_lr(self) -> list[LR]:
        """The learning rates the current step sets; call ``get_last_lr()`` to read them instead.

        They follow the number of ``step()`` calls (``_step_count``), not ``last_epoch``.
        """
        self._warn_unless_inside_step()
        done = self._step_count - 1  # steps taken, the initial one in __init__ not counted
        if self.anneal_epochs == 0:  # no annealing: the very first step already lands on swa_lr
            done = max(1, done)
        span = max(1, self.anneal_epochs)
        alpha_before = _annealed(self._anneal_strategy, _clamp_unit((done - 1) / span))
        alpha = _annealed(self._anneal_strategy, _clamp_unit(done / span))
        lrs = []
        for group in self.optimizer.param_groups:
            lr, swa_lr = group["lr"], group["swa_lr"]
            # Recover the lr the annealing started from, undoing the previous step's blend.
            start = swa_lr if alpha_before == 1 else (lr - alpha_before * swa_lr) / (1 - alpha_before)
            lrs.append(swa_lr * alpha + start * (1 - alpha))
        return lrs

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from ``state_dict()``, this class's or torch's SWALR's.

        Values are checked before anything changes.
        """
        if "_anneal_strategy" in state_dict:
            _check_strategy(state_dict["_anneal_strategy"])
        if "anneal_epochs" in state_dict:
            _check_anneal_epochs(state_dict["anneal_epochs"])
        for key in ("last_epoch", "_step_count"):
            if key in state_dict and not isinstance(state_dict[key], numbers.Integral):
                raise TypeError(f"{key} must be an int, got {type(state_dict[key]).__name__}")
        groups = len(self.optimizer.param_groups)
        for key in ("base_lrs", "_last_lr"):
            if key in state_dict and len(state_dict[key]) != groups:
                raise ValueError(f"{key} has {len(state_dict[key])} values, the optimizer {groups} param groups")
        super().load_state_dict(state_dict)
