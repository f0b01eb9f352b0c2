"""Adadelta (Zeiler, 2012): step sizes from running averages of squared gradients and squared updates."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..core import Check, GroupView, Optimizer, UpdateRule
from ..core.compiled import CompiledUpdate
from ..core.hparams import at_least_zero, learning_rate


def state(h: GroupView) -> dict[str, float]:
    return {"square_avg": 0.0, "acc_delta": 0.0}


def scalars(h: GroupView, step: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(lr=float(h.lr))


def update(p, g, s, h, c) -> None:
    r"""One Adadelta step.

    .. math::
        g &\leftarrow \pm g + \lambda p, \qquad v \leftarrow \rho v + (1-\rho) g^2 \\
        \Delta &\leftarrow \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}} \, g, \qquad
        u \leftarrow \rho u + (1-\rho) \Delta^2, \qquad p \leftarrow p - \eta \Delta

    (:math:`v` is ``square_avg``, :math:`u` is ``acc_delta``; :math:`-g` when maximizing.)
    """
    if h.maximize:
        g = -g
    if h.weight_decay != 0:
        g = g.add(p, alpha=h.weight_decay)
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
    fused=CompiledUpdate(update, scalars),
)


class Adadelta(Optimizer):
    """Adadelta on flat buckets; the constructor, defaults and state of ``torch.optim.Adadelta``.

    The update is written out in :func:`update`. The default (and ``fused=True``, an option torch's
    Adadelta lacks) runs it compiled into one kernel per flat bucket; ``foreach=True`` runs it
    eagerly on the flat bucket, ``foreach=False`` once per parameter.
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
    ) -> None:
        defaults = dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, capturable=capturable,
            foreach=foreach, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)
