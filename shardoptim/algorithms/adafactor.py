"""Adafactor (Shazeer & Stern, 2018), as torch 2.13 has it: second moments factored per matrix.

A matrix algorithm: a matrix's second moment is kept as a row and a column vector, and the step
is scaled by norms of the whole parameter and of its whole update, so parameters are owned whole,
one rank each, balanced on their size (``TensorRule.cost``). Vectors keep an elementwise
``variance``. State is torch's: ``step``, and ``row_var``/``col_var`` (matrices and batches of
them, factored over the last two dimensions) or ``variance``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import Check, HyperParams, Optimizer, ShardingConfig
from ..core.shard_state import scalar_dtype
from ..core.tensor_rule import Shape, TensorRule
from .blocks import split_arguments


def state_shapes(shape: Shape) -> dict[str, Shape]:
    if len(shape) > 1:
        return {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, shape[-1])}
    return {"variance": shape}


def init_state(p: Tensor, h: HyperParams) -> dict[str, Any]:
    state: dict[str, Any] = {"step": torch.tensor(0.0, dtype=scalar_dtype())}
    for name, shape in state_shapes(tuple(p.shape)).items():
        state[name] = p.new_zeros(shape)
    return state


def update(p: Tensor, g: Tensor, state: dict[str, Any], h: HyperParams) -> None:
    r"""One Adafactor step of ``p`` from gradient ``g`` (:math:`-g` when maximizing).

    With :math:`t` the step, :math:`\hat\beta_t = t^{\tau}` (:math:`\tau` = ``beta2_decay``),
    :math:`\rho = \min(\eta, 1/\sqrt t)` and :math:`\alpha = \rho \max(\epsilon_2, \mathrm{RMS}(p))`:

    .. math::
        R \leftarrow R + \hat\beta_t(\overline{g^2}^{\,\mathrm{row}} - R), \quad
        C \leftarrow C + \hat\beta_t(\overline{g^2}^{\,\mathrm{col}} - C), \quad
        \hat V = \frac{R C}{\max(\overline R, \epsilon_1)} \quad
        (\text{a vector: } \hat V = V \leftarrow V + \hat\beta_t (g^2 - V)) \\
        U = \frac{g}{\sqrt{\max(\hat V, \epsilon_1^2)}}, \quad
        p \leftarrow p(1 - \eta\lambda) - \frac{\alpha}{\max(1, \mathrm{RMS}(U) / d)}\, U

    (:math:`\epsilon_1` defaults to the dtype's machine epsilon; the RMS are over the whole tensor.)
    """
    if p.is_complex():
        raise RuntimeError("Adafactor does not support complex parameters")
    if h.maximize:
        g = -g
    eps1, eps2 = h.eps
    if eps1 is None:
        eps1 = torch.finfo(p.dtype).eps
    lr = h.lr.reshape(()) if isinstance(h.lr, Tensor) else h.lr
    state["step"] += 1
    step = state["step"].item()
    beta2 = step**h.beta2_decay
    rho = min(lr, 1 / step**0.5)
    alpha = max(eps2, p.norm(2).item() / p.numel() ** 0.5) * rho
    if h.weight_decay != 0:
        p.mul_(1 - lr * h.weight_decay)
    if g.dim() > 1:
        row_var, col_var = state["row_var"], state["col_var"]
        # mean of g^2 over a row (a column) as a norm squared, without an intermediate of g's size
        row_var.lerp_(torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1)), beta2)
        col_var.lerp_(torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2)), beta2)
        estimate = row_var @ col_var
        estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        variance = state["variance"]
        variance.lerp_(g * g, beta2)
        estimate = variance.clone()
    direction = estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)
    denominator = max(1.0, direction.norm(2).item() / (direction.numel() ** 0.5 * h.d))
    p.add_(direction, alpha=-alpha / denominator)


TENSOR_RULE = TensorRule(
    init_state=init_state, update=update, state_shapes=state_shapes, cost=lambda shape: float(math.prod(shape)),
    scalar_names=("step",),
)

CHECKS = (
    Check("lr", lambda v: not isinstance(v, Tensor) or v.numel() == 1, "Tensor lr must be 1-element"),
    Check("lr", lambda v: 0.0 <= v, "Learning rate should be >= 0 but is: {value}"),
    Check("beta2_decay", lambda v: 0.0 >= v, "beta2_decay should be <= 0 but is: {value}"),
    Check("eps", lambda v: v[0] is None or 0.0 <= v[0], "epsilon1 should be >= 0 but is: {value[0]}"),
    Check("eps", lambda v: 0.0 <= v[1], "epsilon2 should be >= 0 but is: {value[1]}"),
    Check("d", lambda v: 1.0 <= v, "Clipping threshold d should be >= 1 but is: {value}"),
    Check("weight_decay", lambda v: 0.0 <= v, "weight_decay should be >= 0 but is: {value}"),
)


class Adafactor(Optimizer):
    """Adafactor; the constructor, defaults, errors and state of ``torch.optim.Adafactor``.

    The update is :func:`update`. ``foreach`` is accepted and changes nothing: each parameter is
    updated whole, in one call. With a process group each parameter is owned by one rank, balanced
    on size.
    """

    rule = None
    tensor_rule = TENSOR_RULE
    checks = CHECKS

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
