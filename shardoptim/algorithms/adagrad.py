"""Adagrad (Duchi, Hazan & Singer, 2011): per-element step sizes from the sum of squared gradients."""

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
    return {"sum": h.initial_accumulator_value}


def scalars(h: HyperParams, step: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(neg_clr=-h.lr / (1 + (step - 1) * h.lr_decay))


def update(p, g, s, h, c) -> None:
    r"""One Adagrad step.

    .. math::
        S \leftarrow S + g^2, \qquad
        p \leftarrow p - \frac{\eta}{1 + (t-1)\,\delta} \, \frac{g}{\sqrt{S} + \epsilon}

    (:math:`S` is ``sum``, starting at ``initial_accumulator_value``; :math:`\delta` is ``lr_decay``;
    :math:`g` as :func:`~shardoptim.algorithms.blocks.gradient` leaves it.)
    """
    g = gradient(p, g, h, c)
    s.sum.addcmul_(g, g)
    p.addcdiv_(g, s.sum.sqrt().add_(h.eps), value=c.neg_clr)


def sparse_update(p, g, s, h, c) -> None:
    """:func:`update` on the entries a sparse ``g`` holds; other entries keep their values and sums."""
    if h.weight_decay != 0:
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")
    g = (-g if h.maximize else g).coalesce()  # the update is not linear in g: repeated entries summed first
    indices, values = g._indices(), g._values()
    s.sum.add_(torch.sparse_coo_tensor(indices, values.pow(2), g.shape))
    std = s.sum.sparse_mask(g)._values().sqrt_().add_(h.eps)
    p.add_(torch.sparse_coo_tensor(indices, values / std, g.shape), alpha=c.neg_clr)


def kernel(params, grads, states, steps, h, step) -> None:
    torch._fused_adagrad_(
        params, grads, states["sum"], steps, lr=h.lr, lr_decay=h.lr_decay, weight_decay=h.weight_decay,
        eps=h.eps, maximize=h.maximize,
    )


RULE = UpdateRule(
    checks=(
        *learning_rate(),
        at_least_zero("lr_decay", "lr_decay value"),
        at_least_zero("weight_decay", "weight_decay value"),
        at_least_zero("initial_accumulator_value", "initial_accumulator_value value"),
        at_least_zero("eps", "epsilon value"),
    ),
    state=state,
    update=update,
    scalars=scalars,
    kernel=kernel,
    sparse_update=sparse_update,
)


class Adagrad(Optimizer):
    """Adagrad on flat buckets: ``torch.optim.Adagrad``'s constructor, defaults, errors and state.

    As in torch, the state (``step`` 0 and ``sum``) of the constructor's parameters exists from the
    start; unlike torch, a per-group ``initial_accumulator_value`` is honoured (torch uses the
    constructor's for every group). Sparse gradients take :func:`sparse_update`. See
    :class:`shardoptim.Optimizer` for implementations, sharding and the arguments of ours.
    """

    rule = RULE
    state_at_construction = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults, runtime = split_arguments(locals())
        super().__init__(params, defaults, **runtime)

    def share_memory(self) -> None:
        """Move the ``sum`` state to shared memory, as ``torch.optim.Adagrad.share_memory`` does."""
        for bucket in self.buckets:
            for tensor in bucket.state.tensors.values():
                tensor.share_memory_()
