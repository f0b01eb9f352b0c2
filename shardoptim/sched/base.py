"""The scheduler contract: ``LRScheduler``, which every schedule here (and a user's own) builds on."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

from . import step_watch
from .groups import detached_copy, group_values, require_param_groups, set_group_value
from .state import like, to_plain

EPOCH_DEPRECATION_WARNING = (
    "The epoch parameter in `scheduler.step()` is deprecated: call `scheduler.step()` without it. "
    "While it is still accepted, an explicit epoch computes the learning rate from the closed form "
    "of the schedule where one exists, not from the chainable form."
)


class LRScheduler:
    """Base class of learning-rate schedulers; torch.optim.lr_scheduler.LRScheduler's contract.

    A scheduler drives any object with ``param_groups`` (torch's optimizers, ours, sharded or not)
    by writing ``group["lr"]`` (a tensor lr is filled in place). On construction it records each
    group's starting lr as ``group["initial_lr"]`` (kept if already there, e.g. by an earlier
    scheduler), copies those into ``base_lrs``, and takes the first step, to ``last_epoch = 0``.
    Each later ``step()`` advances ``last_epoch`` by one and writes the lrs ``get_lr()`` returns;
    ``get_last_lr()`` returns copies of what was last written.

    Subclasses implement ``get_lr()``; a schedule with a closed form of the epoch may also define
    ``_get_closed_form_lr()``, which the deprecated ``step(epoch)`` uses.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        last_epoch: index of the last epoch done; ``-1`` starts afresh. A value ``>= 0`` resumes and
            needs ``initial_lr`` in every group already (``KeyError`` otherwise).

    Create the scheduler before loading the optimizer's state when restoring a checkpoint:
    construction writes the lrs.
    """

    # Flags that are true only while a step runs; never part of the state.
    _inside_step: bool = False
    _is_initial: bool = False
    _not_state: ClassVar[frozenset[str]] = frozenset({"optimizer", "_inside_step", "_is_initial"})
    # torch keeps its own transient flags in its state dicts; loading skips them.
    _skipped_on_load: ClassVar[frozenset[str]] = frozenset(
        {"optimizer", "_inside_step", "_is_initial", "_get_lr_called_within_step"}
    )

    def __init__(self, optimizer: Any, last_epoch: int = -1) -> None:
        require_param_groups(optimizer)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", detached_copy(group["lr"]))
        else:
            for index, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param_groups[{index}] has no 'initial_lr', needed to resume a scheduler "
                        f"at last_epoch={last_epoch}: load the optimizer's state first, or start "
                        "with last_epoch=-1"
                    )
        self.base_lrs: list[Any] = group_values(optimizer, "initial_lr")
        self.last_epoch = last_epoch
        step_watch.watch_steps(optimizer)
        self._initial_step()

    def _initial_step(self) -> None:
        """Take the constructor's step (also used by ``SequentialLR`` to restart a child)."""
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self) -> list[Any]:
        """The lrs for ``last_epoch``, one per param group; called by ``step()``, not by users."""
        raise NotImplementedError

    def get_last_lr(self) -> list[Any]:
        """Copies of the lrs last written, one per param group (tensors where the groups hold tensors)."""
        return self._last_lr

    def step(self, epoch: int | None = None) -> None:
        """Advance one epoch and write the new lrs; call after ``optimizer.step()``.

        ``epoch`` is deprecated: it sets ``last_epoch`` directly and uses the closed form where the
        schedule has one.
        """
        if self._step_count == 1:
            self._warn_if_stepped_before_optimizer()
        self._step_count += 1
        if epoch is not None:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self._update_lr(epoch)

    def _update_lr(self, epoch: int | None = None) -> None:
        if epoch is None:
            self.last_epoch += 1
            self._apply(self.get_lr)
        else:
            self.last_epoch = epoch
            self._apply(getattr(self, "_get_closed_form_lr", self.get_lr))

    def _apply(self, compute: Callable[[], list[Any]]) -> None:
        """Write the lrs ``compute`` returns (run as part of a step) and remember them."""
        self._inside_step = True
        try:
            lrs = compute()
        finally:
            self._inside_step = False
        groups = self.optimizer.param_groups
        if len(lrs) != len(groups):
            raise ValueError(f"{type(self).__name__} computed {len(lrs)} lrs for {len(groups)} param groups")
        for group, lr in zip(groups, lrs, strict=True):
            set_group_value(group, "lr", lr)
        self._last_lr: list[Any] = group_values(self.optimizer, "lr")

    def _warn_if_stepped_before_optimizer(self) -> None:
        if step_watch.step_was_replaced(self.optimizer):
            warnings.warn(
                "`optimizer.step()` was replaced after the learning rate scheduler was created, so "
                "the scheduler can no longer tell whether it runs after `optimizer.step()`. Call "
                "`optimizer.step()` before `lr_scheduler.step()`.",
                UserWarning,
                stacklevel=3,
            )
        elif step_watch.is_watched(self.optimizer) and not step_watch.has_stepped(self.optimizer):
            warnings.warn(
                "Detected call of `lr_scheduler.step()` before `optimizer.step()`. Since PyTorch "
                "1.1.0 the order is `optimizer.step()` first, then `lr_scheduler.step()`; the other "
                "order skips the first value of the learning rate schedule.",
                UserWarning,
                stacklevel=3,
            )

    def _warn_unless_inside_step(self) -> None:
        if not self._inside_step:
            warnings.warn(
                "To get the last learning rate computed by the scheduler, please use "
                "`get_last_lr()`; `get_lr()` computes the next step's values.",
                UserWarning,
                stacklevel=3,
            )

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state as JSON-ready data: its attributes except the optimizer."""
        return {
            key: to_plain(value) for key, value in vars(self).items() if key not in self._not_state
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state from our ``state_dict()`` or from torch's scheduler of the same name.

        Load the optimizer's state too: the lrs themselves live in its param groups.
        """
        for key, value in state_dict.items():
            if key not in self._skipped_on_load:
                setattr(self, key, like(getattr(self, key, None), value))
