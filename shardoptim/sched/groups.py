"""Per-group hyper-parameters as schedulers see them: read without aliasing, write tensors in place.

A group's ``lr`` may be a Python number or a 0-D tensor (a tensor lr lets a compiled step read it
without recompiling). Values read here are copies, so a caller cannot corrupt a group through them;
values written keep a tensor entry's identity, so anything holding that tensor sees the new value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

#: A hyper-parameter given once for all param groups, or once per group.
PerGroup = float | Sequence[float]


def require_param_groups(optimizer: Any) -> None:
    """Raise ``TypeError`` unless ``optimizer`` looks like an optimizer (has ``param_groups``)."""
    if not hasattr(optimizer, "param_groups"):
        raise TypeError(
            f"{type(optimizer).__name__} is not an Optimizer: a scheduler needs an object with "
            "param_groups"
        )


def detached_copy(value: Any) -> Any:
    """``value`` itself for plain numbers, a clone for tensors."""
    return value.clone() if isinstance(value, Tensor) else value


def group_values(optimizer: Any, key: str) -> list[Any]:
    """``group[key]`` of every param group, tensors cloned; ``KeyError`` where a group lacks it."""
    return [detached_copy(group[key]) for group in optimizer.param_groups]


def set_group_value(group: dict[str, Any], key: str, value: Any) -> None:
    """Store ``value`` as ``group[key]``, filling an existing tensor entry in place."""
    current = group[key]
    if isinstance(current, Tensor):
        if isinstance(value, Tensor) and value.dim() != 0:
            value = value.squeeze()
        current.fill_(value)
    else:
        group[key] = value


def per_group(name: str, optimizer: Any, value: Any) -> list[Any]:
    """One value per param group: a list/tuple must match the group count, a scalar is repeated."""
    count = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"{name} must have one value per param group: got {len(value)} values for "
                f"{count} param groups"
            )
        return [detached_copy(v) for v in value]
    return [detached_copy(value) for _ in range(count)]


def hyperparameter_names(optimizer: Any) -> set[str]:
    """Names the optimizer takes as hyper-parameters: its ``defaults``, else its first group's keys."""
    defaults = getattr(optimizer, "defaults", None)
    if isinstance(defaults, dict):
        return set(defaults)
    groups = optimizer.param_groups
    return set(groups[0]) if groups else set()
