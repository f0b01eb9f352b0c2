"""Rprop (Riedmiller & Braun, 1993): per-element step sizes adapted from the signs of successive gradients."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from ..core import Check, GroupView, Optimizer, UpdateRule
from ..core.compiled import CompiledUpdate
from ..core.hparams import learning_rate


def state(h: GroupView) -> dict[str, float]:
    # Step sizes start at the learning rate; lr plays no other part.
    return {"prev": 0.0, "step_size": float(h.lr)}


def scalars(h: GroupView, step: int) -> types.SimpleNamespace:
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
    if h.maximize:
        g = -g
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
    fused=CompiledUpdate(update, scalars),
)


class Rprop(Optimizer):
    """Rprop on flat buckets; the constructor, defaults and state of ``torch.optim.Rprop``.

    ``state[p]`` holds ``step``, ``prev`` and ``step_size`` as in torch. The update is written out in
    :func:`update`; the default (and ``fused=True``, an option torch's Rprop lacks) runs it compiled
    into one kernel per flat bucket, ``foreach=True`` eagerly on the flat bucket, ``foreach=False`` once
    per parameter.
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
    ) -> None:
        defaults = dict(
            lr=lr, etas=etas, step_sizes=step_sizes, foreach=foreach, maximize=maximize,
            differentiable=differentiable, capturable=capturable, fused=fused,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)
