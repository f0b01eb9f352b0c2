"""Adagrad (Duchi, Hazan & Singer, 2011): per-element step sizes from the sum of squared gradients."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..core import GroupView, Optimizer, UpdateRule
from ..core.hparams import at_least_zero, learning_rate


def state(h: GroupView) -> dict[str, float]:
    return {"sum": float(h.initial_accumulator_value)}


def scalars(h: GroupView, step: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(neg_clr=-float(h.lr) / (1 + (step - 1) * h.lr_decay))


def update(p, g, s, h, c) -> None:
    r"""One Adagrad step.

    .. math::
        g \leftarrow \pm g + \lambda p, \qquad S \leftarrow S + g^2, \qquad
        p \leftarrow p - \frac{\eta}{1 + (t-1)\,\delta} \, \frac{g}{\sqrt{S} + \epsilon}

    (:math:`S` is ``sum``, starting at ``initial_accumulator_value``; :math:`\delta` is ``lr_decay``;
    :math:`-g` when maximizing.)
    """
    if h.maximize:
        g = -g
    if h.weight_decay != 0:
        g = g.add(p, alpha=h.weight_decay)
    s.sum.addcmul_(g, g)
    p.addcdiv_(g * c.neg_clr, s.sum.sqrt().add_(h.eps))


def fused(params, grads, states, steps, h, step) -> None:
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
    fused=fused,
)


class Adagrad(Optimizer):
    """Adagrad on flat buckets; the constructor, defaults and state of ``torch.optim.Adagrad``.

    The update is written out in :func:`update`. ``fused`` (the default on CPU and CUDA) runs torch's
    fused Adagrad kernel once per flat bucket; ``foreach=True`` runs the update eagerly on the flat
    bucket, ``foreach=False`` once per parameter. As in torch, the state (``step`` 0 and ``sum``) of
    the constructor's parameters exists from the start; a per-group ``initial_accumulator_value`` is
    honoured (torch uses the constructor's value for every group).
    """

    rule = RULE

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
    ) -> None:
        defaults = dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
            differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, process_group=process_group, reduce_grads=reduce_grads)
        for bucket in self.buckets:
            initial = RULE.state(GroupView(self.param_groups[bucket.layout.group]))
            bucket.ensure_state(initial)
            for position in range(len(bucket.params)):
                self._expose_state(bucket, position, initial)

    def share_memory(self) -> None:
        """Move the ``sum`` state to shared memory, as ``torch.optim.Adagrad.share_memory`` does."""
        for bucket in self.buckets:
            for tensor in bucket.state.values():
                tensor.share_memory_()
