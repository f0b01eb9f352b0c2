"""The implementations of an update, chosen in this one place and run on pieces of a flat shard.

``foreach`` and ``fused`` mean what they mean in torch: ``fused=True`` (or nothing, on the CPU and
CUDA) is one fused kernel per bucket: torch's where torch has one, else the rule's update compiled;
``foreach=True`` runs the update eagerly over the whole flat shard; ``foreach=False`` runs it once per
parameter, like torch's for-loop.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .alias import real_view
from .compiled import compiled_form
from .rule import HyperParams, UpdateRule
from .tensorlist import run_eager

#: Devices on which torch ships the fused kernels our fused implementations call.
FUSED_DEVICES = ("cpu", "cuda")


class Implementation(enum.Enum):
    """How an update runs over a bucket."""

    FOR_LOOP = "for-loop"  # the update once per parameter
    FOREACH = "foreach"  # the update once per bucket, eagerly, on the flat shard or a TensorList
    FUSED = "fused"  # torch's fused kernel, once per bucket
    COMPILED = "compiled"  # the update compiled into one kernel, once per bucket


def check_flags(group: Mapping[str, Any]) -> None:
    """Reject flag combinations as torch does, and the options shardoptim does not support."""
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if group.get("fused") and group.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if group.get("capturable"):
        raise ValueError("capturable=True is not supported by shardoptim: use torch.optim for CUDA graphs")


def choose_implementation(
    group: Mapping[str, Any], device: torch.device, dtype: torch.dtype, rule: UpdateRule
) -> Implementation:
    """``fused=True`` -> fused; ``foreach=True`` -> foreach; ``foreach=False`` -> for-loop; else the fastest.

    Fused is torch's kernel where the rule has one that works for ``device`` and ``dtype``; where it
    has none, the update compiled; where its kernel is known not to work, foreach.
    """
    if rule.kernel is None:
        fused = Implementation.COMPILED
    else:
        fused = Implementation.FUSED if rule.kernel_works(device, dtype) else Implementation.FOREACH
    if group.get("fused"):
        if device.type not in FUSED_DEVICES:
            raise RuntimeError(
                f"`fused=True` requires all the params to be floating point Tensors of supported devices: "
                f"{list(FUSED_DEVICES)}, but got {device.type}."
            )
        return fused
    if group.get("foreach"):
        return Implementation.FOREACH
    if group.get("foreach") is False:
        return Implementation.FOR_LOOP
    return fused if device.type in FUSED_DEVICES else Implementation.FOREACH


def run_update(
    implementation: Implementation,
    rule: UpdateRule,
    params: list[Tensor],
    grads: list[Tensor],
    states: dict[str, list[Tensor]],
    steps: list[Tensor],
    h: HyperParams,
    step: int,
    c: types.SimpleNamespace,
) -> None:
    """One update of the pieces ``params[i]`` (1-D slices of a flat shard) from ``grads[i]``.

    ``steps`` are 0-D tensors holding ``step`` for torch's fused kernels (empty for the others); ``c``
    the rule's per-step scalars.
    ``COMPILED`` takes one piece: a whole shard.
    """
    if params[0].is_complex():
        # Every algorithm treats a complex number as a pair of reals, as torch.optim does.
        params, grads = list(map(real_view, params)), list(map(real_view, grads))
        states = {name: list(map(real_view, tensors)) for name, tensors in states.items()}
    if implementation is Implementation.FUSED:
        rule.kernel(params, grads, states, steps, h, step)
    elif implementation is Implementation.COMPILED:
        compiled_form(rule)(params[0], grads[0], {name: tensors[0] for name, tensors in states.items()}, h, c)
    elif implementation is Implementation.FOR_LOOP:
        for i, (p, g) in enumerate(zip(params, grads)):
            rule.update(p, g, types.SimpleNamespace(**{name: t[i] for name, t in states.items()}), h, c)
    else:
        run_eager(rule.update, params, grads, states, h, c)
