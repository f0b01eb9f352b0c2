"""Choosing the implementation of an update: the one place ``foreach``/``fused`` are interpreted."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import torch

#: Devices on which torch ships the fused kernels our fused implementations call.
FUSED_DEVICES = ("cpu", "cuda")


class Implementation(enum.Enum):
    """How an update runs over a bucket."""

    FOR_LOOP = "for-loop"  # the update once per parameter
    FOREACH = "foreach"  # the update once per bucket, eagerly, on the flat shard or a TensorList
    FUSED = "fused"  # one fused kernel per bucket


def check_flags(group: Mapping[str, Any], *, has_fused: bool) -> None:
    """Reject flag combinations as torch does, and the options shardoptim does not support."""
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if group.get("fused") and not has_fused:
        raise RuntimeError("`fused` is not supported for this optimizer")
    if group.get("differentiable"):
        raise ValueError("differentiable=True is not supported by shardoptim: use torch.optim for that")
    if group.get("capturable"):
        raise ValueError("capturable=True is not supported by shardoptim: use torch.optim for that")


def resolve_implementation(
    group: Mapping[str, Any], *, device: torch.device, has_fused: bool
) -> Implementation:
    """``fused=True`` -> fused; ``foreach=True`` -> foreach; ``foreach=False`` -> for-loop; else the fastest."""
    if group.get("fused"):
        if device.type not in FUSED_DEVICES:
            raise RuntimeError(
                f"`fused=True` requires all the params to be floating point Tensors of supported devices: "
                f"{list(FUSED_DEVICES)}, but got {device.type}."
            )
        return Implementation.FUSED
    if group.get("foreach"):
        return Implementation.FOREACH
    if group.get("foreach") is False:
        return Implementation.FOR_LOOP
    if has_fused and device.type in FUSED_DEVICES:
        return Implementation.FUSED
    return Implementation.FOREACH
