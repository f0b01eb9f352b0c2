"""What several algorithms share, written once: the gradient an update sees, moment estimates, the
per-step numbers of the Adam family, and the constructors' split of torch's arguments from ours.

Like every update, these run unchanged on single tensors, ``TensorList``s and flat shards, eagerly,
compiled (numbers from ``c`` arrive as 0-D tensors) and differentiably (``Tracked`` tensors).
"""

from __future__ import annotations

import types
from typing import Any

from ..core import HyperParams

#: Constructor arguments of ours, not torch's hyper-parameters: where and how the optimizer runs.
RUNTIME_ARGUMENTS = ("process_group", "reduce_grads", "sharding", "state_dtype")


def split_arguments(arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A constructor's ``locals()`` as (torch's defaults for the param groups, our keyword arguments)."""
    values = {key: value for key, value in arguments.items() if key not in ("self", "params", "__class__")}
    runtime = {key: values.pop(key) for key in RUNTIME_ARGUMENTS}
    return values, runtime


def gradient(p, g, h, c):
    r"""The gradient an update works with.

    .. math::
        g \leftarrow -g \text{ if maximize};\quad
        \begin{cases} p \leftarrow p\,(1 - \eta\lambda) & \text{decoupled weight decay} \\
                      g \leftarrow g + \lambda p & \text{otherwise} \end{cases}

    (:math:`\lambda` is ``weight_decay``; the decoupled factor is ``c.decay``.)
    """
    if h.maximize:
        g = -g
    if getattr(h, "weight_decay", 0) != 0:
        if getattr(h, "decoupled_weight_decay", False):
            p.mul_(c.decay)
        else:
            g = g.add(p, alpha=h.weight_decay)
    return g


def first_moment(m, g, c) -> None:
    r""":math:`m \leftarrow \beta_1 m + (1 - \beta_1) g`."""
    m.lerp_(g, c.one_minus_beta1)


def second_moment(v, g, c) -> None:
    r""":math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`."""
    v.mul_(c.beta2).addcmul_(g, g * c.one_minus_beta2)


def moment_scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    """The per-step numbers of the Adam family: ``lr``, the betas, their complements, both bias
    corrections ``1 - beta**step`` and the decoupled decay factor ``1 - lr * weight_decay``."""
    lr, beta1, beta2 = h.lr, h.betas[0], h.betas[1]
    return types.SimpleNamespace(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        one_minus_beta1=1 - beta1,
        one_minus_beta2=1 - beta2,
        bias_correction1=1 - beta1**step,
        bias_correction2=1 - beta2**step,
        decay=1 - lr * h.weight_decay,
    )
