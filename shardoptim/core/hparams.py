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


def learning_rate() -> tuple[Check, ...]:
    """A float or one-element Tensor learning rate, not negative."""
    return (
        Check("lr", lambda v: not isinstance(v, torch.Tensor) or v.numel() == 1, "Tensor lr must be 1-element"),
        at_least_zero("lr", "learning rate"),
    )


def betas(count: int = 2) -> tuple[Check, ...]:
    """Each of ``betas[0..count)`` in [0, 1)."""
    return tuple(
        Check("betas", lambda v, i=i: 0.0 <= v[i] < 1.0, f"Invalid beta parameter at index {i}: {{value[{i}]}}")
        for i in range(count)
    )
