"""Averaged SGD (Polyak & Juditsky, 1992): SGD with a decaying step size and a running parameter average."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import HyperParams, Optimizer, ShardingConfig, UpdateRule
from ..core.hparams import at_least_zero, learning_rate
from .blocks import gradient, split_arguments


def state(h: HyperParams) -> dict[str, float]:
    return {"ax": 0.0}


def scalar_state(h: HyperParams, step: int, **before: Any) -> dict[str, float]:
    """``eta`` and ``mu`` after ``step`` updates, from the group's current ``lr`` alone; they start at ``lr`` and 1."""
    if step == 0:
        return {"eta": h.lr, "mu": 1.0}
    return {"eta": h.lr / (1 + h.lambd * h.lr * step) ** h.alpha, "mu": 1 / max(1, step - h.t0)}


def scalars(h: HyperParams, step: int, before: dict[str, Any], after: dict[str, Any]) -> types.SimpleNamespace:
    eta, mu = before["eta"], before["mu"]
    return types.SimpleNamespace(eta=eta, decay=1 - h.lambd * eta, mu=mu)


def update(p, g, s, h, c) -> None:
    r"""One ASGD step, with :math:`\eta_t, \mu_t` computed after the previous one (see :func:`scalar_state`).

    .. math::
        p \leftarrow p\,(1 - \lambda \eta_t) - \eta_t g, \qquad
        \bar{x} \leftarrow \bar{x} + \mu_t (p - \bar{x}), \qquad
        \eta_{t+1} = \frac{\gamma}{(1 + \lambda \gamma t)^\alpha}, \qquad
        \mu_{t+1} = \frac{1}{\max(1, t - t_0)}, \qquad \eta_1 = \gamma, \quad \mu_1 = 1

    (:math:`\bar{x}` is ``ax``, :math:`\lambda` ``lambd``; :math:`\gamma` is the ``lr`` at the step
    that computes :math:`\eta_{t+1}`, so a new ``lr`` acts one step later; :math:`\mu_t = 1` makes
    :math:`\bar{x}` a copy of :math:`p`; :math:`g` as :func:`~shardoptim.algorithms.blocks.gradient`
    leaves it.)
    """
    g = gradient(p, g, h, c)
    p.mul_(c.decay).sub_(g * c.eta)
    s.ax.lerp_(p, c.mu)


RULE = UpdateRule(
    checks=(*learning_rate(), at_least_zero("weight_decay", "weight_decay value")),
    state=state,
    update=update,
    scalars=scalars,
    scalar_state=scalar_state,
    sparse_error="ASGD does not support sparse gradients",
)


class ASGD(Optimizer):
    """ASGD on flat buckets: ``torch.optim.ASGD``'s constructor, defaults, errors and state.

    ``state[p]`` holds ``step``, ``eta``, ``mu`` (0-D, per parameter) and the average ``ax``, as in
    torch. Fused (the default, and an option torch's ASGD lacks) is :func:`update` compiled. See
    :class:`shardoptim.Optimizer`.
    """

    rule = RULE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        fused: bool | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
