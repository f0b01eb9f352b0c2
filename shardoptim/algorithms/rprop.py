"""Rprop (Riedmiller & Braun, 1993): per-element step sizes adapted from the signs of successive gradients."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import Check, HyperParams, Optimizer, ShardingConfig, UpdateRule
from ..core.hparams import learning_rate
from .blocks import gradient, split_arguments


def state(h: HyperParams) -> dict[str, float]:
    # Step sizes start at the learning rate; lr plays no other part.
    return {"prev": 0.0, "step_size": h.lr}


def scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    # Nothing per step: the update reads only etas, step_sizes and maximize, which schedulers leave alone.
    return types.SimpleNamespace()


def update(p, g, s, h, c) -> None:
    r"""One Rprop step.

    .. math::
        g &\leftarrow -g \text{ if maximize}, \qquad
        f = \begin{cases} \eta_+ & g\, g_{\text{prev}} > 0 \\ \eta_- & g\, g_{\text{prev}} < 0 \\
                          1 & \text{otherwise} \end{cases}, \qquad
        \delta \leftarrow \operatorname{clamp}(\delta f, \delta_{\min}, \delta_{\max}) \\
        g &\leftarrow 0 \text{ where } g\, g_{\text{prev}} < 0, \qquad
        p \leftarrow p - \delta \operatorname{sign}(g), \qquad g_{\text{prev}} \leftarrow g

    (:math:`\delta` is ``step_size``, :math:`g_{\text{prev}}` is ``prev``; ``etas`` are
    :math:`(\eta_-, \eta_+)`, ``step_sizes`` :math:`(\delta_{\min}, \delta_{\max})`.)
    """
    eta_minus, eta_plus = h.etas
    g = gradient(p, g, h, c)
    # Indicator arithmetic instead of masked assignment keeps every operation a foreach kernel; exactly
    # one of the three terms of the factor is nonzero, so it equals eta+, eta- or 1 bit for bit.
    sign = g.mul(s.prev).sign_()
    flipped = sign.neg().clamp_min_(0)  # 1 where the gradient changed sign, else 0
    kept = sign.clamp_min_(0)  # 1 where it kept its sign, else 0
    factor = (1 - kept - flipped).add_(kept, alpha=eta_plus).add_(flipped, alpha=eta_minus)
    s.step_size.mul_(factor).clamp_min_(h.step_sizes[0]).clamp_max_(h.step_sizes[1])
    s.prev.copy_(g).mul_(flipped.neg_().add_(1))  # a gradient that changed sign counts as zero
    p.addcmul_(s.prev.sign(), s.step_size, value=-1)


RULE = UpdateRule(
    checks=(
        *learning_rate(),
        Check("etas", lambda v: 0.0 < v[0] < 1.0 < v[1], "Invalid eta values: {value[0]}, {value[1]}"),
    ),
    state=state,
    update=update,
    scalars=scalars,
    sparse_error="Rprop does not support sparse gradients",
)


class Rprop(Optimizer):
    """Rprop on flat buckets: ``torch.optim.Rprop``'s constructor, defaults, errors and state.

    ``state[p]`` holds ``step``, ``prev`` and ``step_size`` as in torch. Fused (the default, and an
    option torch's Rprop lacks) is :func:`update` compiled. See :class:`shardoptim.Optimizer`.
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        fused: bool | None = None,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
