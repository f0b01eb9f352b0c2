"""Adamax (Kingma & Ba, 2015, section 7.1): Adam with an infinity-norm second moment."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import HyperParams, Optimizer, ShardingConfig, UpdateRule
from ..core.hparams import at_least_zero, betas, learning_rate
from .blocks import first_moment, gradient, moment_scalars, split_arguments


def state(h: HyperParams) -> dict[str, float]:
    return {"exp_avg": 0.0, "exp_inf": 0.0}


def scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    c = moment_scalars(h, step)
    c.neg_step_size = -c.lr / c.bias_correction1
    return c


def update(p, g, s, h, c) -> None:
    r"""One Adamax step.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        u \leftarrow \max(\beta_2 u, |g| + \epsilon), \qquad
        p \leftarrow p - \frac{\eta}{1-\beta_1^t} \, \frac{m}{u}

    (:math:`m` is ``exp_avg``, :math:`u` is ``exp_inf``; :math:`g` as
    :func:`~shardoptim.algorithms.blocks.gradient` leaves it.)
    """
    g = gradient(p, g, h, c)
    first_moment(s.exp_avg, g, c)
    s.exp_inf.mul_(c.beta2).clamp_min_(g.abs().add_(h.eps))
    p.addcdiv_(s.exp_avg * c.neg_step_size, s.exp_inf)


RULE = UpdateRule(
    checks=(*learning_rate(), at_least_zero("eps", "epsilon value"), *betas(),
            at_least_zero("weight_decay", "weight_decay value")),
    state=state,
    update=update,
    scalars=scalars,
    sparse_error="Adamax does not support sparse gradients",
)


class Adamax(Optimizer):
    """Adamax on flat buckets: ``torch.optim.Adamax``'s constructor, defaults, errors and state.

    Fused (the default, and an option torch's Adamax lacks) is :func:`update` compiled. See
    :class:`shardoptim.Optimizer`.
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
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
