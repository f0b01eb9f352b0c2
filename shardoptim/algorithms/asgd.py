"""Averaged SGD (Polyak & Juditsky, 1992): SGD with a decaying step size and a running parameter average."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..core import GroupView, Optimizer, UpdateRule
from ..core.compiled import CompiledUpdate
from ..core.hparams import at_least_zero, learning_rate


def state(h: GroupView) -> dict[str, float]:
    return {"ax": 0.0}


def scalar_state(h: GroupView, step: int, **previous: float) -> dict[str, float]:
    """``eta`` and ``mu`` after ``step`` updates, from the group's current ``lr`` alone; they start at ``lr`` and 1."""
    lr = float(h.lr)
    return {
        "eta": lr / (1 + h.lambd * lr * step) ** h.alpha,
        "mu": 1 / max(1, step - h.t0) if step > 0 else 1.0,
    }


def scalars(h: GroupView, step: int, eta: float, mu: float) -> types.SimpleNamespace:
    return types.SimpleNamespace(eta=eta, decay=1 - h.lambd * eta, mu=mu)


def update(p, g, s, h, c) -> None:
    r"""One ASGD step, with :math:`\eta_t, \mu_t` computed after the previous one (see :func:`scalar_state`).

    .. math::
        g &\leftarrow \pm g + w p, \qquad
        p \leftarrow p\,(1 - \lambda \eta_t) - \eta_t g, \qquad
        \bar{x} \leftarrow \bar{x} + \mu_t (p - \bar{x}) \\
        \eta_{t+1} &= \frac{\gamma}{(1 + \lambda \gamma t)^\alpha}, \qquad
        \mu_{t+1} = \frac{1}{\max(1, t - t_0)}, \qquad \eta_1 = \gamma, \quad \mu_1 = 1

    (:math:`\bar{x}` is ``ax``, :math:`w` ``weight_decay``, :math:`\lambda` ``lambd``; :math:`\gamma`
    is the ``lr`` at the step that computes :math:`\eta_{t+1}`, so a new ``lr`` acts one step later;
    :math:`\mu_t = 1` makes :math:`\bar{x}` a copy of :math:`p`; :math:`-g` when maximizing.)
    """
    if h.maximize:
        g = -g
    if h.weight_decay != 0:
        g = g.add(p, alpha=h.weight_decay)
    p.mul_(c.decay).sub_(g * c.eta)
    s.ax.lerp_(p, c.mu)


RULE = UpdateRule(
    checks=(*learning_rate(), at_least_zero("weight_decay", "weight_decay value")),
    state=state,
    update=update,
    scalars=scalars,
    fused=CompiledUpdate(update, scalars),
    scalar_state=scalar_state,
)


class ASGD(Optimizer):
    """ASGD on flat buckets; the constructor, defaults and state of ``torch.optim.ASGD``.

    ``state[p]`` holds ``step``, ``eta``, ``mu`` (0-D) and the average ``ax``, as in torch; ``eta``
    and ``mu`` are kept once per parameter in its bucket. Implementations as for
    :class:`~shardoptim.Adadelta` (``fused=True`` is ours; torch's ASGD has no fused kernel).
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        fused: bool | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, foreach=foreach,
            maximize=maximize, differentiable=differentiable, capturable=capturable, fused=fused,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)
