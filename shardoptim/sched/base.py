"""The scheduler contract: ``LRScheduler``, torch's base class with JSON state and our own stepping."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch.optim.lr_scheduler as torch_lr_scheduler
from torch.optim.lr_scheduler import EPOCH_DEPRECATION_WARNING

from . import step_watch
from .groups import detached_copy, group_values, require_param_groups, set_group_value
from .state import like, to_plain

# torch's texts: user code and test suites match on them (the link, "has been overridden").
STEP_OVERRIDDEN_WARNING = (
    "Seems like `optimizer.step()` has been overridden after learning rate scheduler "
    "initialization. Please, make sure to call `optimizer.step()` before "
    "`lr_scheduler.step()`. See more details at "
    "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate"
)
STEPPED_BEFORE_OPTIMIZER_WARNING = (
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`. "
    "In PyTorch 1.1.0 and later, you should call them in the opposite order: "
    "`optimizer.step()` before `lr_scheduler.step()`.  Failure to do this "
    "will result in PyTorch skipping the first value of the learning rate schedule. "
    "See more details at "
    "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate"
)
GET_LR_OUTSIDE_STEP_WARNING = (
    "To get the last learning rate computed by the scheduler, please use `get_last_lr()`."
)


def require_initial_lrs(optimizer: Any, last_epoch: int) -> None:
    """Raise ``KeyError`` when resuming (``last_epoch != -1``) and a group has no ``initial_lr``."""
    if last_epoch == -1:
        return
    for index, group in enumerate(optimizer.param_groups):
        if "initial_lr" not in group:
            # Starts as torch's message does, which callers match on.
            raise KeyError(
                f"param 'initial_lr' is not specified in param_groups[{index}] when resuming scheduler "
                f"with last_epoch >= 0 (last_epoch={last_epoch}): load the optimizer's state first, or "
                "start with last_epoch=-1"
            )


def _record_initial_lrs(optimizer: Any, last_epoch: int) -> None:
    """A fresh start records each group's lr as ``initial_lr`` (kept if already there); a resume needs it."""
    require_initial_lrs(optimizer, last_epoch)
    if last_epoch == -1:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", detached_copy(group["lr"]))


class LRScheduler(torch_lr_scheduler.LRScheduler):
    """Base class of learning-rate schedulers: a ``torch.optim.lr_scheduler.LRScheduler``.

    A scheduler drives any object with ``param_groups`` (torch's optimizers, ours, sharded or not)
    by writing ``group["lr"]`` (a tensor lr is filled in place). On construction it records each
    group's starting lr as ``group["initial_lr"]`` (kept if already there, e.g. by an earlier
    scheduler), copies those into ``base_lrs``, and takes the first step, to ``last_epoch = 0``.
    Each later ``step()`` advances ``last_epoch`` by one and writes the lrs ``get_lr()`` returns;
    ``get_last_lr()`` returns copies of what was last written.

    Subclasses implement ``get_lr()``; a schedule with a closed form of the epoch may also define
    ``_get_closed_form_lr()``, which the deprecated ``step(epoch)`` uses.

    torch's ``__init__`` is not called: it accepts only ``torch.optim.Optimizer`` instances. Its
    observable protocol is kept instead: the same attributes (``base_lrs``, ``last_epoch``,
    ``_step_count``, ``_get_lr_called_within_step``, ``_is_initial``, ``_last_lr``), the same
    ``optimizer.step`` wrapper marks (so torch's schedulers and ours on one optimizer agree on
    whether it stepped), and torch's warnings under the same conditions. ``state_dict()`` differs:
    it is JSON-ready data (see ``shardoptim.sched.state``), and torch's state dicts load too.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        last_epoch: index of the last epoch done; ``-1`` starts afresh. A value ``>= 0`` resumes and
            needs ``initial_lr`` in every group already (``KeyError`` otherwise).

    Create the scheduler before loading the optimizer's state when restoring a checkpoint:
    construction writes the lrs.
    """

    # True only on a scheduler whose optimizer refused the step wrapper: the order goes unchecked.
    _steps_uncounted: bool = False
    # Flags of a step in progress (and of the above), never state; torch's state dicts carry some.
    _not_state: ClassVar[frozenset[str]] = frozenset(
        {"optimizer", "_get_lr_called_within_step", "_is_initial", "_steps_uncounted"}
    )

    def __init__(self, optimizer: Any, last_epoch: int = -1) -> None:
        require_param_groups(optimizer)
        self.optimizer = optimizer
        _record_initial_lrs(optimizer, last_epoch)
        self.base_lrs: list[Any] = group_values(optimizer, "initial_lr")
        self.last_epoch = last_epoch
        if not step_watch.count_steps(optimizer):
            self._steps_uncounted = True
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
            self._warn_about_step_order()
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
        self._get_lr_called_within_step = True
        try:
            lrs = compute()
        finally:
            self._get_lr_called_within_step = False
        groups = self.optimizer.param_groups
        if len(lrs) != len(groups):
            raise ValueError(f"{type(self).__name__} computed {len(lrs)} lrs for {len(groups)} param groups")
        for group, lr in zip(groups, lrs, strict=True):
            set_group_value(group, "lr", lr)
        self._last_lr: list[Any] = group_values(self.optimizer, "lr")

    def _warn_about_step_order(self) -> None:
        """At the first step after construction, as torch: a replaced ``optimizer.step`` (which the
        scheduler can no longer watch), else an optimizer that has not stepped yet."""
        if self._steps_uncounted:
            return
        if not step_watch.step_is_wrapped(self.optimizer):
            warnings.warn(STEP_OVERRIDDEN_WARNING, UserWarning, stacklevel=3)
        elif not step_watch.has_stepped(self.optimizer):
            warnings.warn(STEPPED_BEFORE_OPTIMIZER_WARNING, UserWarning, stacklevel=3)

    def _warn_unless_inside_step(self) -> None:
        if not self._get_lr_called_within_step:
            warnings.warn(GET_LR_OUTSIDE_STEP_WARNING, UserWarning, stacklevel=3)

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
            if key not in self._not_state:
                setattr(self, key, like(getattr(self, key, None), value))
