"""RMSprop (Hinton, 2012; centered variant: Graves, 2013): steps scaled by a running RMS of the gradient."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import HyperParams, Optimizer, ShardingConfig, UpdateRule
from ..core.hparams import at_least_zero, learning_rate
from .blocks import gradient, split_arguments


def state(h: HyperParams) -> dict[str, float]:
    names = {"square_avg": 0.0}
    if h.momentum > 0:
        names["momentum_buffer"] = 0.0
    if h.centered:
        names["grad_avg"] = 0.0
    return names


def scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    # momentum is read from here, not from h: a cyclic scheduler may change it every step.
    return types.SimpleNamespace(lr=h.lr, momentum=h.momentum, has_momentum=h.momentum > 0)


def update(p, g, s, h, c) -> None:
    r"""One RMSprop step.

    .. math::
        v &\leftarrow \alpha v + (1-\alpha) g^2, \qquad
        \bar g \leftarrow \alpha \bar g + (1-\alpha) g \text{ if centered} \\
        d &= \sqrt{v - \bar g^2} + \epsilon \text{ if centered, else } \sqrt{v} + \epsilon, \qquad
        \begin{cases} b \leftarrow \mu b + g / d, \quad p \leftarrow p - \eta b & \mu > 0 \\
                      p \leftarrow p - \eta\, g / d & \text{otherwise} \end{cases}

    (:math:`v` is ``square_avg``, :math:`\bar g` ``grad_avg``, :math:`b` ``momentum_buffer``;
    :math:`g` as :func:`~shardoptim.algorithms.blocks.gradient` leaves it.)
    """
    g = gradient(p, g, h, c)
    s.square_avg.mul_(h.alpha).addcmul_(g, g, value=1 - h.alpha)
    if h.centered:
        s.grad_avg.lerp_(g, 1 - h.alpha)
        denom = (s.square_avg - s.grad_avg * s.grad_avg).sqrt_()
    else:
        denom = s.square_avg.sqrt()
    denom.add_(h.eps)
    if c.has_momentum:
        s.momentum_buffer.mul_(c.momentum).addcdiv_(g, denom)
        p.sub_(s.momentum_buffer * c.lr)
    else:
        p.sub_(g.div(denom).mul_(c.lr))


RULE = UpdateRule(
    checks=(
        *learning_rate(),
        at_least_zero("eps", "epsilon value"),
        at_least_zero("momentum", "momentum value"),
        at_least_zero("weight_decay", "weight_decay value"),
        at_least_zero("alpha", "alpha value"),
    ),
    state=state,
    update=update,
    scalars=scalars,
    sparse_error="RMSprop does not support sparse gradients",
)


class RMSprop(Optimizer):
    """RMSprop on flat buckets: ``torch.optim.RMSprop``'s constructor, defaults, errors and state.

    ``state[p]`` holds ``step`` and ``square_avg``, plus ``momentum_buffer`` when ``momentum > 0`` and
    ``grad_avg`` when ``centered``, as in torch. Fused (the default, and an option torch's RMSprop
    lacks) is :func:`update` compiled. See :class:`shardoptim.Optimizer`.
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        # torch's RMSprop takes these flags positionally too
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        fused: bool | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
