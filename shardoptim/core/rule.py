"""``UpdateRule``: an elementwise algorithm as the base optimizer sees it, and ``HyperParams``."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .hparams import Check

#: Entries of a param group that are not hyper-parameters.
NOT_HYPERPARAMETERS = frozenset({"params", "param_names"})


class HyperParams(types.SimpleNamespace):
    """A param group's hyper-parameters as attributes (``h.lr``), taken once per step.

    ``of(group)`` turns one-element tensors (a tensor ``lr``, tensor ``betas``) into Python numbers,
    which is what the kernels and the per-step scalars take; ``of(group, keep_tensors=True)`` leaves
    them as they are, so a ``differentiable=True`` step keeps the autograd graph through them.
    """

    @staticmethod
    def of(group: Mapping[str, Any], *, keep_tensors: bool = False) -> HyperParams:
        values = {key: value for key, value in group.items() if key not in NOT_HYPERPARAMETERS}
        if not keep_tensors:
            values = {key: _as_number(value) for key, value in values.items()}
        return HyperParams(**values)


def _as_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple) and any(isinstance(item, torch.Tensor) for item in value):
        return tuple(_as_number(item) for item in value)
    return value


def _no_scalars(h: HyperParams, step: int, **scalar_state: float) -> types.SimpleNamespace:
    return types.SimpleNamespace()


def _everywhere(device: torch.device, dtype: torch.dtype) -> bool:
    return True


@dataclass(frozen=True)
class UpdateRule:
    """Everything the base optimizer needs to run one elementwise algorithm on flat buckets.

    ``update(p, g, s, h, c)`` is the algorithm's math, written once against the Tensor API: ``p`` and
    ``g`` are a parameter and its gradient, ``s`` a namespace of state tensors named as in torch,
    ``h`` the group's ``HyperParams`` and ``c`` the per-step scalars ``scalars(h, step, **scalar_state)``
    returns. ``p``, ``g`` and ``s.*`` may be single tensors (one parameter, or a whole flat shard) or
    ``TensorList``s; the math must not care which. Values a scheduler changes (``lr``, ``betas``,
    ``momentum``) are read from ``c`` and combined with tensor operators, so the compiled form takes
    them as 0-D tensors and never recompiles for them.

    ``state(h)`` names the per-element state tensors and the value each starts at. ``kernel``, when
    given, is torch's fused kernel taking lists: ``kernel(params, grads, states, steps, h, step)``
    with ``states`` mapping each state name to a list and ``steps`` holding 0-D step tensors already
    incremented; a rule without one runs its ``update`` compiled when fused. ``kernel_works(device,
    dtype)`` says where the kernel may be used (elsewhere the update runs foreach).

    ``scalar_state``, when given, declares per-parameter scalars that torch keeps as 0-D state tensors
    next to ``step`` (ASGD's ``eta`` and ``mu``, NAdam's ``mu_product``), held in torch's scalar dtype
    on the CPU as torch holds them: ``scalar_state(h, step, **before)`` returns their values once a
    parameter has taken ``step`` updates, from the 0-D tensors ``before`` holding their values after
    ``step - 1`` (empty at step 0, and when a loaded state dict lacks them). ``scalars`` then receives
    both, as numbers: ``scalars(h, step, before=..., after=...)``; a rule without scalar state gets
    ``scalars(h, step)``.

    ``sparse_update(p, g, s, h, c)``, when given, updates one parameter from a sparse gradient (the
    rows of ``nn.Embedding(sparse=True)``), with ``p`` and ``s.*`` shaped like the parameter; without
    it a sparse gradient raises ``RuntimeError(sparse_error)``.
    """

    checks: tuple[Check, ...]
    state: Callable[[HyperParams], dict[str, float]]
    update: Callable[..., None]
    scalars: Callable[..., types.SimpleNamespace] = _no_scalars
    kernel: Callable[..., None] | None = None
    kernel_works: Callable[[torch.device, torch.dtype], bool] = _everywhere
    #: torch keeps a per-parameter ``step`` tensor in this algorithm's state.
    step_in_state: bool = True
    scalar_state: Callable[..., dict[str, Any]] | None = None
    sparse_update: Callable[..., None] | None = None
    sparse_error: str = "this optimizer does not support sparse gradients"
    #: The update relies on a cast to a narrower dtype rounding as it does eagerly (a master copy
    #: compared with the parameters): compiled, such casts are kept, not fused away.
    exact_casts: bool = False
