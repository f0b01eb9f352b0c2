"""Declarative hyper-parameter checks.

Every algorithm lists its checks once; the base optimizer runs them on each param group, both in the
constructor and in ``add_param_group``, so a per-group override such as ``{"params": ..., "lr": -1}``
is rejected with the same error as a bad constructor argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Check:
    """One rule on a param group: ``message`` is formatted with ``value`` when it fails.

    ``value`` is ``group[key]``, or the whole group when ``key`` is None (rules tying several entries).
    """

    key: str | None
    is_valid: Callable[[Any], bool]
    message: str
    error: type[Exception] = ValueError

    def __call__(self, group: Mapping[str, Any]) -> None:
        value = group if self.key is None else group[self.key]
        if not self.is_valid(value):
            raise self.error(self.message.format(value=value))


def validate(group: Mapping[str, Any], checks: Iterable[Check]) -> None:
    """Raise the first failing check's error for ``group``."""
    for check in checks:
        check(group)


def at_least_zero(key: str, label: str) -> Check:
    """``group[key] >= 0``, reported as torch words it: ``Invalid <label>: <value>``."""
    return Check(key, lambda v: 0.0 <= v, f"Invalid {label}: {{value}}")


def not_negative(key: str, label: str) -> Check:
    """``not group[key] < 0`` (NaN passes), as torch's SGD words its checks: ``Invalid <label>: <value>``."""
    return Check(key, lambda v: not v < 0.0, f"Invalid {label}: {{value}}")


def learning_rate(*, nan_passes: bool = False) -> tuple[Check, ...]:
    """A float or one-element Tensor learning rate, not negative (``nan_passes``: torch's SGD form)."""
    return (
        Check("lr", lambda v: not isinstance(v, torch.Tensor) or v.numel() == 1, "Tensor lr must be 1-element"),
        (not_negative if nan_passes else at_least_zero)("lr", "learning rate"),
    )


def betas(count: int = 2) -> tuple[Check, ...]:
    """Each of ``betas[0..count)`` in [0, 1)."""
    return tuple(
        Check("betas", lambda v, i=i: 0.0 <= v[i] < 1.0, f"Invalid beta parameter at index {i}: {{value[{i}]}}")
        for i in range(count)
    )


def _tensor_under_foreach(value: Any, group: Mapping[str, Any]) -> bool:
    return isinstance(value, torch.Tensor) and bool(group.get("foreach")) and not group.get("capturable")


def tensor_hyperparameters() -> tuple[Check, ...]:
    """torch's Adam rules for tensor ``lr`` and ``betas``: not with ``foreach=True`` (unless capturable),
    one element each, and betas both floats or both tensors."""
    def beta(i: int) -> tuple[Check, ...]:
        return (
            Check(None, lambda g: not _tensor_under_foreach(g["betas"][i], g),
                  f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True"),
            Check("betas", lambda v: not isinstance(v[i], torch.Tensor) or v[i].numel() == 1,
                  f"Tensor betas[{i}] must be 1-element"),
        )

    return (
        Check("betas", lambda v: all(isinstance(b, float) for b in v[:2]) or all(isinstance(b, torch.Tensor) for b in v[:2]),
              "betas must be either both floats or both Tensors"),
        *beta(0),
        *beta(1),
    )


def tensor_lr_under_foreach() -> Check:
    """torch's Adam refuses a tensor ``lr`` with ``foreach=True`` unless capturable."""
    return Check(None, lambda g: not _tensor_under_foreach(g["lr"], g),
                 "lr as a Tensor is not supported for capturable=False and foreach=True")


def adam_checks() -> tuple[Check, ...]:
    """Adam's and AdamW's checks, in torch's order."""
    return (
        tensor_lr_under_foreach(),
        *learning_rate(),
        at_least_zero("eps", "epsilon value"),
        *betas(),
        at_least_zero("weight_decay", "weight_decay value"),
        *tensor_hyperparameters(),
    )
