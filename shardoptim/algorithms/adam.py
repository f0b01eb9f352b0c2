"""Adam and AdamW (Kingma & Ba, 2015; Loshchilov & Hutter, 2019)."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import HyperParams, Optimizer, ShardingConfig, UpdateRule
from ..core.hparams import adam_checks
from .blocks import first_moment, gradient, moment_scalars, second_moment, split_arguments


def state(h: HyperParams) -> dict[str, float]:
    names = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
    if h.amsgrad:
        names["max_exp_avg_sq"] = 0.0
    return names


def scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    c = moment_scalars(h, step)
    c.step_size = c.lr / c.bias_correction1
    c.bias_correction2_sqrt = c.bias_correction2**0.5
    return c


def update(p, g, s, h, c) -> None:
    r"""One Adam step; ``h.decoupled_weight_decay`` makes it AdamW.

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \qquad \hat v \leftarrow \max(\hat v, v) \text{ if amsgrad} \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t} \, \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    (:math:`g` as :func:`~shardoptim.algorithms.blocks.gradient` leaves it.)
    """
    g = gradient(p, g, h, c)
    first_moment(s.exp_avg, g, c)
    second_moment(s.exp_avg_sq, g, c)
    second = s.max_exp_avg_sq.clamp_min_(s.exp_avg_sq) if h.amsgrad else s.exp_avg_sq
    denom = (second.sqrt() / c.bias_correction2_sqrt).add_(h.eps)
    p.addcdiv_(s.exp_avg, denom, value=-c.step_size)


def kernel(params, grads, states, steps, h, step) -> None:
    fused = torch._fused_adamw_ if h.decoupled_weight_decay else torch._fused_adam_
    fused(
        params, grads, states["exp_avg"], states["exp_avg_sq"], states.get("max_exp_avg_sq", []), steps,
        lr=h.lr, beta1=h.betas[0], beta2=h.betas[1], weight_decay=h.weight_decay, eps=h.eps,
        amsgrad=h.amsgrad, maximize=h.maximize,
    )


RULE = UpdateRule(
    checks=adam_checks(),
    state=state,
    update=update,
    scalars=scalars,
    kernel=kernel,
    sparse_error="Adam does not support sparse gradients, please consider SparseAdam instead",
)


class Adam(Optimizer):
    """Adam on flat buckets: ``torch.optim.Adam``'s constructor, defaults, errors and state.

    The update is written out in :func:`update`; the fused implementation (the default on CPU and
    CUDA) is torch's fused Adam kernel once per bucket. Implementations, sharding and the arguments
    of ours (``process_group``, ``reduce_grads``, ``sharding``, ``state_dtype``) are described on
    :class:`shardoptim.Optimizer`.
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay and ``weight_decay=1e-2``; ``torch.optim.AdamW``'s signature."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            process_group=process_group, reduce_grads=reduce_grads, sharding=sharding, state_dtype=state_dtype,
        )
