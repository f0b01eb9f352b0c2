"""NAdam (Dozat, 2016): Adam with Nesterov momentum and a warming-up momentum schedule."""

from __future__ import annotations

import math
import types
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..core import GroupView, Optimizer, UpdateRule
from ..core.compiled import CompiledUpdate
from ..core.hparams import at_least_zero, betas, learning_rate


def state(h: GroupView) -> dict[str, float]:
    return {"exp_avg": 0.0, "exp_avg_sq": 0.0}


def _momentum_coefficient(h: GroupView, step: int) -> float:
    r""":math:`\mu_t = \beta_1 (1 - \tfrac12 \, 0.96^{t\psi})`, the momentum of update ``step``."""
    return float(h.betas[0]) * (1.0 - 0.5 * 0.96 ** (step * h.momentum_decay))


def scalar_state(h: GroupView, step: int, mu_product: float | None = None) -> dict[str, float]:
    """``mu_product`` after ``step`` updates: the product of their momentum coefficients.

    Kept as a running product (``mu_product`` is the value after ``step - 1`` updates), so a schedule
    that changes ``betas`` weighs each update with the ``beta1`` it ran with, as torch does. Given no
    previous value (step 0, or a loaded state dict without one), it is taken over the group's current
    hyper-parameters.
    """
    if mu_product is None:
        return {"mu_product": math.prod(_momentum_coefficient(h, t) for t in range(1, step + 1))}
    return {"mu_product": mu_product * _momentum_coefficient(h, step)}


def scalars(h: GroupView, step: int, mu_product: float) -> types.SimpleNamespace:
    lr, beta1, beta2 = float(h.lr), float(h.betas[0]), float(h.betas[1])
    mu, mu_next = _momentum_coefficient(h, step), _momentum_coefficient(h, step + 1)
    product = scalar_state(h, step, mu_product)["mu_product"]
    return types.SimpleNamespace(
        decay=1 - lr * h.weight_decay,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        bias_correction2_sqrt=(1 - beta2**step) ** 0.5,
        grad_step=-lr * (1 - mu) / (1 - product),
        exp_avg_step=-lr * mu_next / (1 - product * mu_next),
    )


def update(p, g, s, h, c) -> None:
    r"""One NAdam step; ``h.decoupled_weight_decay`` makes it NAdamW.

    .. math::
        g &\leftarrow -g \text{ if maximize};\quad
        \begin{cases} p \leftarrow p(1 - \eta\lambda) & \text{decoupled} \\
                      g \leftarrow g + \lambda p & \text{otherwise} \end{cases} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \qquad \mu_t = \beta_1\bigl(1 - \tfrac12\, 0.96^{t\psi}\bigr),
        \qquad \Pi_t = \textstyle\prod_{i \le t} \mu_i \\
        p &\leftarrow p - \eta \, \frac{\frac{1-\mu_t}{1-\Pi_t}\, g + \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}}\, m}
                               {\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    (:math:`\psi` is ``momentum_decay``; :math:`\Pi_t` is ``mu_product``, kept per parameter.)
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
    denom = (s.exp_avg_sq.sqrt() / c.bias_correction2_sqrt).add_(h.eps)
    p.addcdiv_((g * c.grad_step).add_(s.exp_avg * c.exp_avg_step), denom)


RULE = UpdateRule(
    checks=(
        *learning_rate(),
        at_least_zero("eps", "epsilon value"),
        *betas(),
        at_least_zero("weight_decay", "weight_decay value"),
        at_least_zero("momentum_decay", "momentum_decay value"),
    ),
    state=state,
    update=update,
    scalars=scalars,
    fused=CompiledUpdate(update, scalars),
    scalar_state=scalar_state,
)


class NAdam(Optimizer):
    """NAdam on flat buckets; the constructor, defaults and state of ``torch.optim.NAdam``.

    ``state[p]`` holds ``step``, ``mu_product`` (0-D, one per parameter as in torch), ``exp_avg`` and
    ``exp_avg_sq``. The update is written out in :func:`update`; the default (and ``fused=True``, an
    option torch's NAdam lacks) runs it compiled into one kernel per flat bucket, ``foreach=True``
    eagerly on the flat bucket, ``foreach=False`` once per parameter.
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)
