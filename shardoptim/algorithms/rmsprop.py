"""RMSprop (Hinton, 2012; centered variant: Graves, 2013): steps scaled by a running RMS of the gradient."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..core import GroupView, Optimizer, UpdateRule
from ..core.compiled import CompiledUpdate
from ..core.hparams import at_least_zero, learning_rate


def state(h: GroupView) -> dict[str, float]:
    names = {"square_avg": 0.0}
    if h.momentum > 0:
        names["momentum_buffer"] = 0.0
    if h.centered:
        names["grad_avg"] = 0.0
    return names


def scalars(h: GroupView, step: int) -> types.SimpleNamespace:
    # momentum is read from here, not from h: a cyclic scheduler may change it every step.
    return types.SimpleNamespace(lr=float(h.lr), momentum=float(h.momentum), has_momentum=h.momentum > 0)


def update(p, g, s, h, c) -> None:
    r"""One RMSprop step.

    .. math::
        g &\leftarrow \pm g + \lambda p, \qquad v \leftarrow \alpha v + (1-\alpha) g^2, \qquad
        \bar g \leftarrow \alpha \bar g + (1-\alpha) g \text{ if centered} \\
        d &= \sqrt{v - \bar g^2} + \epsilon \text{ if centered, else } \sqrt{v} + \epsilon, \qquad
        \begin{cases} b \leftarrow \mu b + g / d, \quad p \leftarrow p - \eta b & \mu > 0 \\
                      p \leftarrow p - \eta\, g / d & \text{otherwise} \end{cases}

    (:math:`v` is ``square_avg``, :math:`\bar g` ``grad_avg``, :math:`b` ``momentum_buffer``;
    :math:`-g` when maximizing.)
    """
    if h.maximize:
        g = -g
    if h.weight_decay != 0:
        g = g.add(p, alpha=h.weight_decay)
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
    fused=CompiledUpdate(update, scalars),
)


class RMSprop(Optimizer):
    """RMSprop on flat buckets; the constructor, defaults and state of ``torch.optim.RMSprop``.

    ``state[p]`` holds ``step`` and ``square_avg``, plus ``momentum_buffer`` when ``momentum > 0`` and
    ``grad_avg`` when ``centered``, as in torch. The update is written out in :func:`update`; the
    default (and ``fused=True``, an option torch's RMSprop lacks) runs it compiled into one kernel per
    flat bucket, ``foreach=True`` eagerly on the flat bucket, ``foreach=False`` once per parameter.
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
        # torch's RMSprop takes its flags positionally too
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        fused: bool | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)
