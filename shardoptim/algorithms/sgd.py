"""Stochastic gradient descent with momentum, dampening, Nesterov momentum and weight decay."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import Check, GroupView, Optimizer, UpdateRule
from ..core.hparams import at_least_zero, learning_rate


def state(h: GroupView) -> dict[str, float]:
    return {"momentum_buffer": 0.0} if h.momentum != 0 else {}


def scalars(h: GroupView, step: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(lr=float(h.lr), weight_decay=float(h.weight_decay), first_step=step == 1)


def update(p, g, s, h, c) -> None:
    r"""One SGD step.

    .. math::
        g \leftarrow \pm g + \lambda p;\quad
        b \leftarrow \begin{cases} g & t = 1 \\ \mu b + (1-\tau) g & t > 1 \end{cases};\quad
        d \leftarrow \begin{cases} g + \mu b & \text{nesterov} \\ b & \text{otherwise} \end{cases};\quad
        p \leftarrow p - \eta d

    (:math:`-g` when maximizing; no buffer when :math:`\mu = 0`, then :math:`d = g`.)
    """
    if h.maximize:
        g = -g
    if c.weight_decay != 0:
        g = g.add(p, alpha=c.weight_decay)
    if h.momentum != 0:
        buf = s.momentum_buffer
        if c.first_step:
            buf.copy_(g)
        else:
            buf.mul_(h.momentum).add_(g, alpha=1 - h.dampening)
        g = g.add(buf, alpha=h.momentum) if h.nesterov else buf
    p.add_(g, alpha=-c.lr)


def fused(params, grads, states, steps, h, step) -> None:
    torch._fused_sgd_(
        params, grads, states.get("momentum_buffer", []), weight_decay=float(h.weight_decay),
        momentum=h.momentum, lr=h.lr, dampening=h.dampening, nesterov=h.nesterov, maximize=h.maximize,
        is_first_step=step == 1,
    )


RULE = UpdateRule(
    checks=(
        *learning_rate(),
        at_least_zero("momentum", "momentum value"),
        at_least_zero("weight_decay", "weight_decay value"),
        Check(
            None,
            lambda group: not group["nesterov"] or (group["momentum"] > 0 and group["dampening"] == 0),
            "Nesterov momentum requires a momentum and zero dampening",
        ),
    ),
    state=state,
    update=update,
    scalars=scalars,
    fused=fused,
    step_in_state=False,
)


class SGD(Optimizer):
    """SGD on flat buckets; the constructor, defaults and state of ``torch.optim.SGD``.

    The update is written out in :func:`update`; implementations as for :class:`~shardoptim.Adam`.
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
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)
