"""Muon (Jordan et al., 2024): momentum, then each matrix's update orthogonalised by Newton-Schulz.

A matrix algorithm: the orthogonalisation needs the whole matrix, so parameters are owned whole,
one rank each, balanced on the cost of the iterations (``TensorRule.cost``:
:math:`m \\cdot n \\cdot \\min(m, n)` per iteration for an :math:`m \\times n` matrix), and the
updated matrices reach every rank through the bucket's gather. State is torch's: one
``momentum_buffer`` per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import Check, HyperParams, Optimizer, ShardingConfig
from ..core.tensor_rule import Shape, TensorRule
from .blocks import split_arguments

#: torch's defaults: the quintic's coefficients, the iterations, and the norm's floor.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def orthogonalize(update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    r"""An approximation of :math:`U V^\top` for :math:`U S V^\top = ` ``update``, in bfloat16.

    ``steps`` iterations of the quintic :math:`X \leftarrow aX + (bA + cA^2)X`, :math:`A = XX^\top`,
    from :math:`X = G / \max(\lVert G \rVert_F, \epsilon)`; on the wide orientation of the matrix,
    so :math:`A` is the smaller Gram matrix.
    """
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if update.dim() != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.bfloat16()
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, polynomial, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float | Tensor, adjust_lr_fn: str | None, shape: Shape) -> float | Tensor:
    """The learning rate for a matrix of ``shape``: scaled by :math:`\\sqrt{\\max(1, m/n)}` ("original",
    the default), or by :math:`0.2\\sqrt{\\max(m, n)}` to match AdamW's update RMS ("match_rms_adamw")."""
    rows, columns = shape[:2]
    if adjust_lr_fn in (None, "original"):
        ratio = math.sqrt(max(1, rows / columns))
    else:  # "match_rms_adamw" (the constructor allows nothing else)
        ratio = 0.2 * math.sqrt(max(rows, columns))
    return lr * ratio  # the ratio first, then lr: torch's rounding


def init_state(p: Tensor, h: HyperParams) -> dict[str, Any]:
    return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}


def update(p: Tensor, g: Tensor, state: dict[str, Any], h: HyperParams) -> None:
    r"""One Muon step of matrix ``p`` from gradient ``g``.

    .. math::
        B \leftarrow \mu B + (1-\mu) g;\quad
        U \leftarrow \mathrm{NS}(g + \mu (B - g) \text{ if nesterov else } B);\quad
        p \leftarrow p (1 - \eta\lambda) - \eta' U

    with :math:`\eta'` the learning rate adjusted to ``p``'s shape (:func:`adjusted_lr`).
    """
    if p.is_complex():
        raise RuntimeError("Muon does not support complex parameters")
    if g.dim() != 2:
        raise ValueError("Param gradient must be a 2D matrix")
    lr = h.lr.reshape(()) if isinstance(h.lr, Tensor) else h.lr
    momentum = state["momentum_buffer"]
    momentum.lerp_(g, 1 - h.momentum)
    direction = g.lerp(momentum, h.momentum) if h.nesterov else momentum
    direction = orthogonalize(direction, h.ns_coefficients, h.ns_steps, h.eps)
    p.mul_(1 - lr * h.weight_decay)
    p.add_(direction, alpha=-adjusted_lr(lr, h.adjust_lr_fn, tuple(p.shape)))


def cost(shape: Shape) -> float:
    """Multiply-adds of one Newton-Schulz iteration, up to a constant: :math:`m n \\min(m, n)`."""
    if len(shape) != 2:
        return 0.0
    rows, columns = shape
    return float(rows * columns * min(rows, columns))


def check_matrices(params: Iterable[Tensor]) -> None:
    """torch's ``ValueError`` for a parameter that is not a matrix."""
    for param in params:
        if param.ndim != 2:
            raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {param.size()}")


TENSOR_RULE = TensorRule(
    init_state=init_state, update=update, cost=cost,
    state_shapes=lambda shape: {"momentum_buffer": shape},
)

CHECKS = (
    Check("lr", lambda v: not isinstance(v, Tensor) or v.numel() == 1, "Tensor lr must be 1-element"),
    Check("lr", lambda v: 0.0 <= v, "Learning rate should be >= 0 but is: {value}"),
    Check("momentum", lambda v: 0.0 <= v, "momentum should be >= 0 but is: {value}"),
    Check("weight_decay", lambda v: 0.0 <= v, "weight decay should be >= 0 but is: {value}"),
    Check("adjust_lr_fn", lambda v: v in ADJUST_LR_FNS,
          "Adjust learning rate function {value} is not supported"),
)


class Muon(Optimizer):
    """Muon; the constructor, defaults, errors and state of ``torch.optim.Muon``.

    For the 2-D weights of hidden layers (embeddings, heads, biases and norms are for AdamW:
    ``shardoptim.muon_param_groups`` splits a model so). The update is :func:`update`. With a
    process group each matrix is owned by one rank, which orthogonalises it; ranks are balanced on
    the cost of that (``memory_report()`` shows the balance).
    """

    rule = None
    tensor_rule = TENSOR_RULE
    checks = CHECKS

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)
        for group in self.param_groups:
            check_matrices(group["params"])
