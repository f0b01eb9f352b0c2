"""``ReduceLROnPlateau``: cut the lr when a watched metric stops improving."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, SupportsFloat

import torch.optim.lr_scheduler as torch_lr_scheduler
from torch.optim.lr_scheduler import EPOCH_DEPRECATION_WARNING

from .base import LRScheduler
from .groups import PerGroup, group_values, require_param_groups, set_group_value


def _check_modes(mode: str, threshold_mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode {mode} is unknown! Expected 'min' or 'max'")
    if threshold_mode not in ("rel", "abs"):
        raise ValueError(f"threshold mode {threshold_mode} is unknown! Expected 'rel' or 'abs'")


class ReduceLROnPlateau(LRScheduler, torch_lr_scheduler.ReduceLROnPlateau):
    """Multiply the lr by ``factor`` once a metric has not improved for more than ``patience``
    steps. ``step(metric)`` is called once per evaluation.

    A metric ``a`` improves on the best so far when, in "min" mode,
    ``a < best * (1 - threshold)`` ("rel") or ``a < best - threshold`` ("abs"), and in "max" mode
    ``a > best * (1 + threshold)`` ("rel") or ``a > best + threshold`` ("abs"). Each step that does
    not improve counts as bad; when the count exceeds ``patience`` every group's lr becomes
    ``max(lr * factor, min_lr)`` (left unchanged when that lowers it by no more than ``eps``), the
    count restarts and the next ``cooldown`` steps count no bad steps.

    Unlike the other schedulers it does not touch the lrs on construction and records no
    ``initial_lr``. It is a ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (so trainers that pass
    it the metric recognise it) whose methods are all ours.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        mode: "min" (lower metric is better) or "max". Default: "min".
        factor: multiplier of the lr on a plateau, below 1. Default: 0.1.
        patience: bad steps tolerated before reducing. Default: 10.
        threshold: how much better counts as better. Default: 1e-4.
        threshold_mode: "rel" or "abs". Default: "rel".
        cooldown: steps after a reduction during which bad steps are not counted. Default: 0.
        min_lr: lower bound of the lr, one value or one per group. Default: 0.
        eps: smallest lr change applied. Default: 1e-8.
    """

    def __init__(
        self,
        optimizer: Any,
        mode: Literal["min", "max"] = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_lr: PerGroup = 0,
        eps: float = 1e-8,
    ) -> None:
        if factor >= 1.0:
            raise ValueError(f"Factor should be < 1.0, got {factor}")
        require_param_groups(optimizer)
        self._init_is_better(mode, threshold, threshold_mode)
        self.factor = factor
        self.optimizer = optimizer
        count = len(optimizer.param_groups)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != count:
                raise ValueError(f"expected {count} min_lrs (one per param group), got {len(min_lr)}")
            self.default_min_lr: float | None = None
            self.min_lrs = list(min_lr)
        else:
            self.default_min_lr = min_lr
            self.min_lrs = [min_lr] * count
        self.patience = patience
        self.cooldown = cooldown
        self.eps = eps
        self.last_epoch = 0
        self._last_lr = group_values(optimizer, "lr")
        self._reset()

    def _init_is_better(self, mode: str, threshold: float, threshold_mode: str) -> None:
        """Check and set what ``_is_better`` compares by (torch's hook name, for subclasses)."""
        _check_modes(mode, threshold_mode)
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.mode_worse = math.inf if mode == "min" else -math.inf

    def _reset(self) -> None:
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self) -> bool:
        """Whether bad steps are currently being ignored after a reduction."""
        return self.cooldown_counter > 0

    def _is_better(self, a: float, best: float) -> bool:
        """Whether metric ``a`` counts as an improvement on ``best`` (see the class docstring)."""
        if self.mode == "min":
            return a < best * (1.0 - self.threshold) if self.threshold_mode == "rel" else a < best - self.threshold
        return a > best * (self.threshold + 1.0) if self.threshold_mode == "rel" else a > best + self.threshold

    def step(self, metrics: SupportsFloat, epoch: int | None = None) -> None:  # type: ignore[override]
        """Record one evaluation of the metric (a number or a one-element tensor)."""
        current = float(metrics)
        if epoch is not None:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        improved = self._is_better(current, self.best)
        if improved:
            self.best = current
        self.num_bad_epochs = 0 if improved else self.num_bad_epochs + 1
        if self.in_cooldown:
            # Bad steps right after a reduction do not count towards the next one.
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce_lr(self.last_epoch)
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = group_values(self.optimizer, "lr")

    def _reduce_lr(self, epoch: int) -> None:
        """Cut every group's lr (``epoch`` unused: torch's hook signature, kept for subclasses)."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                # torch's text, which callers match on.
                raise RuntimeError(
                    f"The number of param groups in the `optimizer` ({len(groups)}) differs from when "
                    f"`ReduceLROnPlateau` was initialized ({len(self.min_lrs)}), usually due to a new "
                    "param group being added to the optimizer. Please modify the `min_lrs` field to "
                    "match the length of the `optimizer` param groups."
                )
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs, strict=True):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                set_group_value(group, "lr", new_lr)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._init_is_better(self.mode, self.threshold, self.threshold_mode)
