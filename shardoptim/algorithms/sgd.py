"""Stochastic gradient descent with momentum, dampening, Nesterov momentum and weight decay."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import Check, HyperParams, Optimizer, ShardingConfig, UpdateRule
from ..core.hparams import learning_rate, not_negative
from .blocks import gradient, split_arguments


def state(h: HyperParams) -> dict[str, float]:
    return {"momentum_buffer": 0.0} if h.momentum != 0 else {}


def scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(lr=h.lr, first_step=step == 1)


def _direction(g, buf, h, c):
    """The step direction once the momentum buffer holds this step's value."""
    return g.add(buf, alpha=h.momentum) if h.nesterov else buf


def update(p, g, s, h, c) -> None:
    r"""One SGD step.

    .. math::
        b \leftarrow \begin{cases} g & t = 1 \\ \mu b + (1-\tau) g & t > 1 \end{cases};\quad
        d \leftarrow \begin{cases} g + \mu b & \text{nesterov} \\ b & \text{otherwise} \end{cases};\quad
        p \leftarrow p - \eta d

    (:math:`g` as :func:`~shardoptim.algorithms.blocks.gradient` leaves it; no buffer when
    :math:`\mu = 0`, then :math:`d = g`.)
    """
    g = gradient(p, g, h, c)
    if h.momentum != 0:
        buf = s.momentum_buffer
        if c.first_step:
            buf.copy_(g.detach())  # as torch: the buffer starts outside the graph, even when differentiable
        else:
            buf.mul_(h.momentum).add_(g, alpha=1 - h.dampening)
        g = _direction(g, buf, h, c)
    p.add_(g, alpha=-c.lr)


def sparse_update(p, g, s, h, c) -> None:
    """:func:`update` for a sparse ``g`` (``nn.Embedding(sparse=True)``): the buffer starts from zeros
    plus ``g``, since a dense tensor cannot ``copy_`` a sparse one."""
    if h.momentum != 0 and c.first_step:
        g = gradient(p, g, h, c)
        s.momentum_buffer.zero_().add_(g.detach())
        p.add_(_direction(g, s.momentum_buffer, h, c), alpha=-c.lr)
        return
    update(p, g, s, h, c)


def kernel(params, grads, states, steps, h, step) -> None:
    torch._fused_sgd_(
        params, grads, states.get("momentum_buffer", []), weight_decay=h.weight_decay, momentum=h.momentum,
        lr=h.lr, dampening=h.dampening, nesterov=h.nesterov, maximize=h.maximize, is_first_step=step == 1,
    )


def kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    # torch 2.13's CPU _fused_sgd_ leaves the vectorised part of float16/bfloat16 tensors unchanged
    # (only the last len % 16 elements move): those buckets run foreach.
    return not (device.type == "cpu" and dtype in (torch.float16, torch.bfloat16))


RULE = UpdateRule(
    checks=(  # torch's SGD words its checks as "x < 0": NaN passes them
        *learning_rate(nan_passes=True),
        not_negative("momentum", "momentum value"),
        not_negative("weight_decay", "weight_decay value"),
        Check(
            None,
            lambda group: not (group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0)),
            "Nesterov momentum requires a momentum and zero dampening",
        ),
    ),
    state=state,
    update=update,
    scalars=scalars,
    kernel=kernel,
    kernel_works=kernel_works,
    step_in_state=False,
    sparse_update=sparse_update,
)


class SGD(Optimizer):
    """SGD on flat buckets: ``torch.optim.SGD``'s constructor, defaults, errors and state.

    The update is written out in :func:`update`; sparse gradients take :func:`sparse_update`. See
    :class:`shardoptim.Optimizer` for implementations, sharding and the arguments of ours.
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
