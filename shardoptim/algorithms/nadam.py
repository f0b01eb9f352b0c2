"""NAdam (Dozat, 2016): Adam with Nesterov momentum and a warming-up momentum schedule."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import HyperParams, Optimizer, ShardingConfig, UpdateRule
from ..core.hparams import at_least_zero, betas, learning_rate
from ..core.shard_state import scalar_dtype
from .blocks import first_moment, gradient, moment_scalars, second_moment, split_arguments


def state(h: HyperParams) -> dict[str, float]:
    return {"exp_avg": 0.0, "exp_avg_sq": 0.0}


def _momentum(h: HyperParams, step: int) -> float:
    r""":math:`\mu_t = \beta_1 (1 - \tfrac12 \, 0.96^{t\psi})`, the momentum of update ``step``."""
    return h.betas[0] * (1.0 - 0.5 * 0.96 ** (step * h.momentum_decay))


def scalar_state(h: HyperParams, step: int, mu_product: Tensor | None = None) -> dict[str, Any]:
    """``mu_product`` after ``step`` updates: the running product of their momenta, in torch's scalar
    dtype (so it rounds as torch's does). Without the previous value (a loaded state dict lacking
    it) it is taken over the group's current hyper-parameters."""
    if step == 0:
        return {"mu_product": 1.0}
    if mu_product is None:
        mu_product = torch.ones((), dtype=scalar_dtype())
        for earlier in range(1, step):
            mu_product = mu_product * _momentum(h, earlier)
    return {"mu_product": mu_product * _momentum(h, step)}


def scalars(h: HyperParams, step: int, before: dict[str, Any], after: dict[str, Any]) -> types.SimpleNamespace:
    c = moment_scalars(h, step)
    mu, mu_next, product = _momentum(h, step), _momentum(h, step + 1), after["mu_product"]
    c.bias_correction2_sqrt = c.bias_correction2**0.5
    c.grad_step = -c.lr * (1.0 - mu) / (1.0 - product)
    c.exp_avg_step = -c.lr * mu_next / (1.0 - product * mu_next)
    return c


def update(p, g, s, h, c) -> None:
    r"""One NAdam step; ``h.decoupled_weight_decay`` makes it NAdamW.

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \qquad \mu_t = \beta_1\bigl(1 - \tfrac12\, 0.96^{t\psi}\bigr),
        \qquad \Pi_t = \textstyle\prod_{i \le t} \mu_i \\
        p &\leftarrow p - \eta \, \frac{\frac{1-\mu_t}{1-\Pi_t}\, g + \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}}\, m}
                               {\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    (:math:`\psi` is ``momentum_decay``; :math:`\Pi_t` is ``mu_product``, kept per parameter;
    :math:`g` as :func:`~shardoptim.algorithms.blocks.gradient` leaves it.)
    """
    g = gradient(p, g, h, c)
    first_moment(s.exp_avg, g, c)
    second_moment(s.exp_avg_sq, g, c)
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
    scalar_state=scalar_state,
    sparse_error="NAdam does not support sparse gradients",
)


class NAdam(Optimizer):
    """NAdam on flat buckets: ``torch.optim.NAdam``'s constructor, defaults, errors and state.

    ``state[p]`` holds ``step``, ``mu_product`` (0-D, per parameter, as in torch), ``exp_avg`` and
    ``exp_avg_sq``. The update is written out in :func:`update`; fused (the default, and an option
    torch's NAdam lacks) is that update compiled. See :class:`shardoptim.Optimizer`.
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
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
