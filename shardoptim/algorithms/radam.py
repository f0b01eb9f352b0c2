"""RAdam (Liu et al., 2020): Adam whose adaptive step is switched on once its variance is tractable."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..core import GroupView, Optimizer, UpdateRule
from ..core.compiled import CompiledUpdate
from ..core.hparams import at_least_zero, betas, learning_rate


def state(h: GroupView) -> dict[str, float]:
    return {"exp_avg": 0.0, "exp_avg_sq": 0.0}


def scalars(h: GroupView, step: int) -> types.SimpleNamespace:
    lr, beta1, beta2 = float(h.lr), float(h.betas[0]), float(h.betas[1])
    bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / bias_correction2
    # The branch on rho_t is decided here, on the host, and folded into two step sizes of which one is
    # zero: the update has no branch, and its compiled form one graph for both regimes.
    if rho_t > 5:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive_step, plain_step = -lr * rect * bias_correction2**0.5 / bias_correction1, 0.0
    else:
        adaptive_step, plain_step = 0.0, -lr / bias_correction1
    return types.SimpleNamespace(
        decay=1 - lr * h.weight_decay,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        adaptive_step=adaptive_step,
        plain_step=plain_step,
    )


def update(p, g, s, h, c) -> None:
    r"""One RAdam step.

    .. math::
        g &\leftarrow -g \text{ if maximize};\quad
        \begin{cases} p \leftarrow p(1 - \eta\lambda) & \text{decoupled} \\
                      g \leftarrow g + \lambda p & \text{otherwise} \end{cases} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \qquad \rho_\infty = \tfrac{2}{1-\beta_2} - 1,
        \qquad \rho_t = \rho_\infty - \tfrac{2 t \beta_2^t}{1-\beta_2^t} \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t} \begin{cases}
            r_t \sqrt{1-\beta_2^t}\, \frac{m}{\sqrt{v} + \epsilon} & \rho_t > 5 \\
            m & \text{otherwise} \end{cases}, \qquad
        r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}
    """
    if h.maximize:
        g = -g
    if h.weight_decay != 0:
        if h.decoupled_weight_decay:
            p.mul_(c.decay)
        else:
            g = g.add(p, alpha=h.weight_decay)
    s.exp_avg.lerp_(g, c.one_minus_beta1)
    s.exp_avg_sq.mul_(c.beta2).addcmul_(g, g * c.one_minus_beta2)
    # Per element, the step per unit of exp_avg; adaptive_step or plain_step is zero (see scalars).
    rate = s.exp_avg_sq.sqrt().add_(h.eps).reciprocal_().mul_(c.adaptive_step).add_(c.plain_step)
    p.addcmul_(s.exp_avg, rate)


RULE = UpdateRule(
    checks=(
        *learning_rate(),
        at_least_zero("eps", "epsilon value"),
        *betas(),
        at_least_zero("weight_decay", "weight_decay value"),
    ),
    state=state,
    update=update,
    scalars=scalars,
    fused=CompiledUpdate(update, scalars),
)


class RAdam(Optimizer):
    """RAdam on flat buckets; the constructor, defaults and state of ``torch.optim.RAdam``.

    The update is written out in :func:`update`; the default (and ``fused=True``, an option torch's
    RAdam lacks) runs it compiled into one kernel per flat bucket, ``foreach=True`` eagerly on the
    flat bucket, ``foreach=False`` once per parameter.
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        fused: bool | None = None,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        process_group: Any = None,
        reduce_grads: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)
