"""Adam and AdamW (Kingma & Ba, 2015; Loshchilov & Hutter, 2019)."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import GroupView, Optimizer, UpdateRule
from ..core.hparams import at_least_zero, betas, learning_rate


def state(h: GroupView) -> dict[str, float]:
    names = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
    if h.amsgrad:
        names["max_exp_avg_sq"] = 0.0
    return names


def scalars(h: GroupView, step: int) -> types.SimpleNamespace:
    lr, beta1, beta2 = float(h.lr), float(h.betas[0]), float(h.betas[1])
    return types.SimpleNamespace(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        step_size=lr / (1 - beta1**step),
        bias_correction2_sqrt=(1 - beta2**step) ** 0.5,
    )


def update(p, g, s, h, c) -> None:
    r"""One Adam step; ``h.decoupled_weight_decay`` makes it AdamW.

    .. math::
        g &\leftarrow -g \text{ if maximize};\quad
        \begin{cases} p \leftarrow p(1 - \eta\lambda) & \text{decoupled} \\
                      g \leftarrow g + \lambda p & \text{otherwise} \end{cases} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \qquad \hat v \leftarrow \max(\hat v, v) \text{ if amsgrad} \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t} \, \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
    """
    if h.maximize:
        g = -g
    if h.weight_decay != 0:
        if h.decoupled_weight_decay:
            p.mul_(1 - c.lr * h.weight_decay)
        else:
            g = g.add(p, alpha=h.weight_decay)
    s.exp_avg.lerp_(g, 1 - c.beta1)
    s.exp_avg_sq.mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
    second_moment = s.exp_avg_sq
    if h.amsgrad:
        second_moment = s.max_exp_avg_sq.clamp_min_(s.exp_avg_sq)
    denom = (second_moment.sqrt() / c.bias_correction2_sqrt).add_(h.eps)
    p.addcdiv_(s.exp_avg, denom, value=-c.step_size)


def fused(params, grads, states, steps, h, step) -> None:
    kernel = torch._fused_adamw_ if h.decoupled_weight_decay else torch._fused_adam_
    kernel(
        params, grads, states["exp_avg"], states["exp_avg_sq"], states.get("max_exp_avg_sq", []), steps,
        lr=h.lr, beta1=float(h.betas[0]), beta2=float(h.betas[1]), weight_decay=h.weight_decay, eps=h.eps,
        amsgrad=h.amsgrad, maximize=h.maximize,
    )


RULE = UpdateRule(
    checks=(*learning_rate(), at_least_zero("eps", "epsilon value"), *betas(),
            at_least_zero("weight_decay", "weight_decay value")),
    state=state,
    update=update,
    scalars=scalars,
    fused=fused,
)


class Adam(Optimizer):
    """Adam on flat buckets; the constructor, defaults and state of ``torch.optim.Adam``.

    The update is written out in :func:`update`. ``fused`` (the default on CPU and CUDA) runs torch's
    fused Adam kernel once per flat bucket; ``foreach=True`` runs the update eagerly on the flat
    bucket; ``foreach=False`` runs it once per parameter. ``capturable`` and ``differentiable`` are
    not supported and raise ``ValueError``.
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
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay, default ``weight_decay=1e-2``; ``torch.optim.AdamW``'s signature."""

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
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            process_group=process_group, reduce_grads=reduce_grads,
        )
