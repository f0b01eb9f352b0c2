"""Adadelta (Zeiler, 2012): step sizes from running averages of squared gradients and squared updates."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import Check, HyperParams, Optimizer, ShardingConfig, UpdateRule
from ..core.hparams import at_least_zero, learning_rate
from .blocks import gradient, split_arguments


def state(h: HyperParams) -> dict[str, float]:
    return {"square_avg": 0.0, "acc_delta": 0.0}


def scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(lr=h.lr)


def update(p, g, s, h, c) -> None:
    r"""One Adadelta step.

    .. math::
        v \leftarrow \rho v + (1-\rho) g^2, \qquad
        \Delta \leftarrow \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}} \, g, \qquad
        u \leftarrow \rho u + (1-\rho) \Delta^2, \qquad p \leftarrow p - \eta \Delta

    (:math:`v` is ``square_avg``, :math:`u` is ``acc_delta``; :math:`g` as
    :func:`~shardoptim.algorithms.blocks.gradient` leaves it.)
    """
    g = gradient(p, g, h, c)
    s.square_avg.mul_(h.rho).addcmul_(g, g, value=1 - h.rho)
    delta = s.acc_delta.add(h.eps).sqrt_().div_(s.square_avg.add(h.eps).sqrt_()).mul_(g)
    s.acc_delta.mul_(h.rho).addcmul_(delta, delta, value=1 - h.rho)
    p.sub_(delta.mul_(c.lr))


RULE = UpdateRule(
    checks=(
        *learning_rate(),
        Check("rho", lambda v: 0.0 <= v <= 1.0, "Invalid rho value: {value}"),
        at_least_zero("eps", "epsilon value"),
        at_least_zero("weight_decay", "weight_decay value"),
    ),
    state=state,
    update=update,
    scalars=scalars,
    sparse_error="Adadelta does not support sparse gradients",
)


class Adadelta(Optimizer):
    """Adadelta on flat buckets: ``torch.optim.Adadelta``'s constructor, defaults, errors and state.

    Fused (the default, and an option torch's Adadelta lacks) is :func:`update` compiled. See
    :class:`shardoptim.Optimizer`.
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
