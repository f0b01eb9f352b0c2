"""Adamax (Kingma & Ba, 2015, section 7.1): Adam with an infinity-norm second moment."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..core import GroupView, Optimizer, UpdateRule
from ..core.compiled import CompiledUpdate
from ..core.hparams import at_least_zero, betas, learning_rate


def state(h: GroupView) -> dict[str, float]:
    return {"exp_avg": 0.0, "exp_inf": 0.0}


def scalars(h: GroupView, step: int) -> types.SimpleNamespace:
    lr, beta1 = float(h.lr), float(h.betas[0])
    return types.SimpleNamespace(beta1=beta1, beta2=float(h.betas[1]), neg_step_size=-lr / (1 - beta1**step))


def update(p, g, s, h, c) -> None:
    r"""One Adamax step.

    .. math::
        g \leftarrow \pm g + \lambda p, \qquad m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        u \leftarrow \max(\beta_2 u, |g| + \epsilon), \qquad
        p \leftarrow p - \frac{\eta}{1-\beta_1^t} \, \frac{m}{u}

    (:math:`m` is ``exp_avg``, :math:`u` is ``exp_inf``; :math:`-g` when maximizing.)
    """
    if h.maximize:
        g = -g
    if h.weight_decay != 0:
        g = g.add(p, alpha=h.weight_decay)
    s.exp_avg.lerp_(g, 1 - c.beta1)
    s.exp_inf.mul_(c.beta2).clamp_min_(g.abs().add_(h.eps))
    p.addcdiv_(s.exp_avg * c.neg_step_size, s.exp_inf)


RULE = UpdateRule(
    checks=(*learning_rate(), at_least_zero("eps", "epsilon value"), *betas(),
            at_least_zero("weight_decay", "weight_decay value")),
    state=state,
    update=update,
    scalars=scalars,
    fused=CompiledUpdate(update, scalars),
)


class Adamax(Optimizer):
    """Adamax on flat buckets; the constructor, defaults and state of ``torch.optim.Adamax``.

    Implementations as for :class:`~shardoptim.Adadelta`: compiled by default (also ``fused=True``,
    which torch's Adamax does not offer), eager on the flat bucket with ``foreach=True``, per
    parameter with ``foreach=False``.
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        fused: bool | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, maximize=maximize,
            differentiable=differentiable, capturable=capturable, fused=fused,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)
