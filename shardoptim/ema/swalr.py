"""``SWALR``: anneal every param group's learning rate to a constant SWA learning rate."""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

LR = float | Tensor

_STRATEGIES = ("cos", "linear")
_STATE_KEYS = ("base_lrs", "last_epoch", "anneal_epochs", "_step_count", "_last_lr", "_anneal_strategy")


def _annealed(strategy: str, t: float) -> float:
    """Fraction of the way from the starting lr to ``swa_lr`` at progress ``t`` in [0, 1]."""
    if strategy == "cos":
        return (1 - math.cos(math.pi * t)) / 2
    return t


def _clamp_unit(t: float) -> float:
    return max(0, min(1, t))


def _detached(value: LR) -> LR:
    return value.clone() if isinstance(value, Tensor) else value


def _plain(value: LR) -> float:
    return value.item() if isinstance(value, Tensor) else value


class SWALR:
    """Anneals each param group's learning rate to ``swa_lr`` in ``anneal_epochs`` steps, then holds it.

    Meant for the averaging phase of Stochastic Weight Averaging (see ``AveragedModel``). Each
    ``step()`` moves the lr a further fraction of the way from where the annealing started to
    ``group["swa_lr"]``, the fraction following half a cosine (``"cos"``) or a straight line
    (``"linear"``); after ``anneal_epochs`` steps the lr stays at ``swa_lr``. The annealing starts
    from whatever lr the group has when it begins, so SWALR can take over from another scheduler.

    Behaves as ``torch.optim.swa_utils.SWALR`` (same arguments, errors, learning rates bit for bit,
    ``initial_lr`` / ``last_epoch`` handling) without being built on torch's scheduler classes. It
    notices a ``step()`` made before any ``optimizer.step()`` through an optimizer step hook (torch
    wraps ``optimizer.step`` instead) and warns as torch does. ``state_dict()`` is plain JSON data
    under torch's key names, so either scheduler loads the other's; tensor learning rates are
    stored there as floats.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (shardoptim's included).
        swa_lr: the target lr, for all groups, or a list/tuple with one per group. Stored in each
            group as ``group["swa_lr"]``.
        anneal_epochs: steps the annealing takes, an ``int`` >= 0.
        anneal_strategy: ``"cos"`` or ``"linear"``.
        last_epoch: ``-1`` for a fresh start; otherwise the index of the last step when resuming,
            and every group must then have ``"initial_lr"``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        swa_lr: LR | Sequence[LR],
        anneal_epochs: int = 10,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        groups = optimizer.param_groups
        if isinstance(swa_lr, (list, tuple)):
            if len(swa_lr) != len(groups):
                raise ValueError(
                    f"swa_lr must have the same length as optimizer.param_groups. "
                    f"swa_lr has {len(swa_lr)} values, param_groups has {len(groups)}."
                )
            swa_lrs = [_detached(value) for value in swa_lr]
        else:
            swa_lrs = [_detached(swa_lr) for _ in groups]
        if anneal_strategy not in _STRATEGIES:
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}")
        if last_epoch != -1:
            for index, group in enumerate(groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param 'initial_lr' is not specified in param_groups[{index}] when resuming "
                        f"a scheduler with last_epoch={last_epoch}: load the optimizer's state dict "
                        f"first, or start with last_epoch=-1"
                    )

        for group, value in zip(groups, swa_lrs):
            group["swa_lr"] = value
            if last_epoch == -1:
                group.setdefault("initial_lr", _detached(group["lr"]))
        self.optimizer = optimizer
        self.anneal_epochs = anneal_epochs
        self._anneal_strategy: str = anneal_strategy
        self.base_lrs: list[LR] = [_detached(group["initial_lr"]) for group in groups]
        self.last_epoch = last_epoch
        self._step_count = 0
        self._last_lr: list[LR] = []
        self._inside_step = False
        self._optimizer_stepped = False
        self_ref = weakref.ref(self)
        handle = optimizer.register_step_post_hook(lambda *_: _note_optimizer_step(self_ref))
        weakref.finalize(self, handle.remove)
        self.step()

    @property
    def anneal_strategy(self) -> str:
        """``"cos"`` or ``"linear"``."""
        return self._anneal_strategy

    def get_last_lr(self) -> list[LR]:
        """The learning rates the last ``step()`` set, one per param group."""
        return self._last_lr

    def get_lr(self) -> list[LR]:
        """The learning rates the current step sets; call ``get_last_lr()`` to read them instead."""
        if not self._inside_step:
            warnings.warn(
                "To get the last learning rate computed by the scheduler, please use `get_last_lr()`.",
                UserWarning,
                stacklevel=2,
            )
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

    def step(self, epoch: int | None = None) -> None:
        """Advance one step and write the new learning rates into the param groups.

        Call it after ``optimizer.step()``. ``epoch`` (deprecated, as in torch) sets ``last_epoch``
        instead of incrementing it; the learning rates follow the number of ``step()`` calls either way.
        """
        if self._step_count == 1 and not self._optimizer_stepped:
            warnings.warn(
                "Detected call of `lr_scheduler.step()` before `optimizer.step()`. Call "
                "`optimizer.step()` first, or the first value of the learning rate schedule is skipped.",
                UserWarning,
                stacklevel=2,
            )
        self._step_count += 1
        if epoch is None:
            self.last_epoch += 1
        else:
            warnings.warn(
                "The epoch parameter in `scheduler.step()` is deprecated; call `scheduler.step()` without it.",
                UserWarning,
                stacklevel=2,
            )
            self.last_epoch = epoch
        self._inside_step = True
        try:
            lrs = self.get_lr()
        finally:
            self._inside_step = False
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(_plain(lr))
            else:
                group["lr"] = lr
        self._last_lr = [_detached(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state as JSON-serialisable data (torch's key names; tensors become floats)."""
        return {
            "base_lrs": [_plain(lr) for lr in self.base_lrs],
            "last_epoch": self.last_epoch,
            "anneal_epochs": self.anneal_epochs,
            "_step_count": self._step_count,
            "_last_lr": [_plain(lr) for lr in self._last_lr],
            "_anneal_strategy": self._anneal_strategy,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from ``state_dict()``, this class's or torch's SWALR's.

        Keys it does not know are ignored and missing keys keep their current values, as in torch.
        Values are checked before anything changes.
        """
        known = {key: state_dict[key] for key in _STATE_KEYS if key in state_dict}
        if "_anneal_strategy" in known and known["_anneal_strategy"] not in _STRATEGIES:
            raise ValueError(
                f"anneal_strategy must be one of 'cos' or 'linear', instead got {known['_anneal_strategy']}"
            )
        if "anneal_epochs" in known and (
            not isinstance(known["anneal_epochs"], int) or known["anneal_epochs"] < 0
        ):
            raise ValueError(f"anneal_epochs must be equal or greater than 0, got {known['anneal_epochs']}")
        for key in ("last_epoch", "_step_count"):
            if key in known and not isinstance(known[key], numbers.Integral):
                raise TypeError(f"{key} must be an int, got {type(known[key]).__name__}")
        for key in ("base_lrs", "_last_lr"):
            if key in known and len(known[key]) != len(self.optimizer.param_groups):
                raise ValueError(
                    f"{key} has {len(known[key])} values, the optimizer {len(self.optimizer.param_groups)} param groups"
                )
        for key, value in known.items():
            setattr(self, key, list(value) if key in ("base_lrs", "_last_lr") else value)


def _note_optimizer_step(scheduler_ref: weakref.ref[SWALR]) -> None:
    scheduler = scheduler_ref()
    if scheduler is not None:
        scheduler._optimizer_stepped = True
