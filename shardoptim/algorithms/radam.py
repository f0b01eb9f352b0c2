"""RAdam (Liu et al., 2020): Adam whose adaptive step is switched on once its variance is tractable."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import HyperParams, Optimizer, ShardingConfig, UpdateRule
from ..core.hparams import at_least_zero, betas, learning_rate
from .blocks import first_moment, gradient, moment_scalars, second_moment, split_arguments


def state(h: HyperParams) -> dict[str, float]:
    return {"exp_avg": 0.0, "exp_avg_sq": 0.0}


def scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    c = moment_scalars(h, step)
    rho_inf = 2 / (1 - c.beta2) - 1
    rho_t = rho_inf - 2 * step * c.beta2**step / c.bias_correction2
    # The branch on rho_t is decided here, on the host, and folded into two step sizes of which one is
    # zero: the update has no branch, and its compiled form one graph for both regimes.
    if rho_t > 5:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        c.adaptive_step, c.plain_step = -c.lr * rect * c.bias_correction2**0.5 / c.bias_correction1, 0.0
    else:
        c.adaptive_step, c.plain_step = 0.0, -c.lr / c.bias_correction1
    return c


def update(p, g, s, h, c) -> None:
    r"""One RAdam step.

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \qquad \rho_\infty = \tfrac{2}{1-\beta_2} - 1,
        \qquad \rho_t = \rho_\infty - \tfrac{2 t \beta_2^t}{1-\beta_2^t} \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t} \begin{cases}
            r_t \sqrt{1-\beta_2^t}\, \frac{m}{\sqrt{v} + \epsilon} & \rho_t > 5 \\
            m & \text{otherwise} \end{cases}, \qquad
        r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    (:math:`g` as :func:`~shardoptim.algorithms.blocks.gradient` leaves it.)
    """
    g = gradient(p, g, h, c)
    first_moment(s.exp_avg, g, c)
    second_moment(s.exp_avg_sq, g, c)
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
    sparse_error="RAdam does not support sparse gradients",
)


class RAdam(Optimizer):
    """RAdam on flat buckets: ``torch.optim.RAdam``'s constructor, defaults, errors and state.

    Fused (the default, and an option torch's RAdam lacks) is :func:`update` compiled. See
    :class:`shardoptim.Optimizer`.
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
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
