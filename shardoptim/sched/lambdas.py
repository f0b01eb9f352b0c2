"""Schedules given by user functions of the epoch: ``LambdaLR`` and ``MultiplicativeLR``."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from .base import LRScheduler
from .groups import group_values, require_param_groups

EpochFunction = Callable[[int], float]


class _PerGroupFunctions(LRScheduler):
    """Holds one function of the epoch per param group (``lr_lambdas``).

    Functions cannot go into a state dict; as in torch, a callable *object* contributes a copy of
    its ``__dict__`` and a plain function or lambda contributes ``None``.
    """

    _not_state = LRScheduler._not_state | {"lr_lambdas"}

    def __init__(
        self, optimizer: Any, lr_lambda: EpochFunction | list[EpochFunction], last_epoch: int = -1
    ) -> None:
        require_param_groups(optimizer)
        count = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != count:
                raise ValueError(f"Expected {count} lr_lambdas (one per param group), but got {len(lr_lambda)}")
            self.lr_lambdas: list[EpochFunction] = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * count
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(f"lr_lambda should be a function, but got {type(fn).__name__}")
        super().__init__(optimizer, last_epoch)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lr_lambdas"] = [
            None if isinstance(fn, types.FunctionType) else dict(getattr(fn, "__dict__", {}))
            for fn in self.lr_lambdas
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "lr_lambdas"})
        saved_functions = state_dict.get("lr_lambdas")
        if saved_functions is None:
            return
        for fn, saved in zip(self.lr_lambdas, saved_functions, strict=True):
            if saved is not None:
                fn.__dict__.update(saved)


class LambdaLR(_PerGroupFunctions):
    """Set each group's lr to its base lr times a function of the epoch:
    ``lr_t = base_lr * lr_lambda(t)``. Not chainable: it overwrites the lr.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        lr_lambda: a function of the epoch, or a list with one per param group.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    def get_lr(self) -> list[Any]:
        self._warn_unless_inside_step()
        return [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]


class MultiplicativeLR(_PerGroupFunctions):
    """Multiply each group's current lr by a function of the epoch every step:
    ``lr_t = lr_{t-1} * lr_lambda(t)`` for ``t >= 1``; construction leaves the lr as it is.

    Args:
        optimizer: object whose ``param_groups`` are scheduled.
        lr_lambda: a function of the epoch, or a list with one per param group.
        last_epoch: index of the last epoch; ``-1`` starts afresh.
    """

    def get_lr(self) -> list[Any]:
        self._warn_unless_inside_step()
        lrs = group_values(self.optimizer, "lr")
        if self._is_initial:
            return lrs
        return [lr * fn(self.last_epoch) for fn, lr in zip(self.lr_lambdas, lrs, strict=True)]
