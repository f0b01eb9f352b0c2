"""A rule's own update compiled into one kernel: the fused implementation where torch has none.

The same ``update(p, g, s, h, c)`` that runs eagerly is handed to ``torch.compile`` once per rule.
Per-step numbers travel as 0-D tensors that are refilled in place, and the compiled graph treats
tensor sizes as dynamic, so neither the step count, a scheduler's new learning rate nor a bucket of
another size recompiles it. Flags (``maximize``, ``amsgrad``, ...) and constant hyper-parameters are
part of the graph: a group with other flags compiles once more.

Rule authors: read everything a scheduler may change (``lr``, ``momentum``, ``betas``) from ``c``, not
``h``, and combine ``c``'s values with tensor operators rather than ``alpha=``/``value=`` arguments,
which must be Python numbers.
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .rule import GroupView
from .tensorlist import run_eager

logger = logging.getLogger(__name__)

_GROUP_ENTRIES_NOT_HYPERPARAMETERS = ("params", "param_names")


class CompiledUpdate:
    """``fused`` for an ``UpdateRule``: its ``update`` compiled with ``torch.compile``.

    The optimizer calls it on whole flat shards only: a step where only some parameters have
    gradients runs the foreach implementation over their views instead, since views of one buffer
    at many offsets would make the compiler specialise on each, for a path that is rare by nature.
    If compilation fails (no C++ compiler, an unsupported platform), it warns once and runs the same
    update eagerly from then on (``run_eager``): the foreach implementation, never an error.
    """

    def __init__(self, update: Callable[..., None], scalars: Callable[[GroupView, int], Any]) -> None:
        self._update = update
        self._scalars = scalars
        self._kernel: Callable[..., None] | None = None
        self._eager = False
        self._warned = False
        self._scalar_tensors: dict[tuple[torch.device, torch.dtype, str], Tensor] = {}

    def __call__(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: dict[str, list[Tensor]],
        steps: list[Tensor],
        h: GroupView,
        step: int,
        **scalar_state: float,
    ) -> None:
        c = self._scalars(h, step, **scalar_state)
        if not self._eager:
            try:
                self._run_compiled(params, grads, states, h, c)
                return
            except Exception as error:  # noqa: BLE001 - compiler failures fall back, as documented
                if _is_recompile_limit(error):
                    # Too many distinct flag/constant sets for one update: the graphs already compiled
                    # keep serving their groups, this one runs eagerly.
                    self._warn_once(
                        f"torch.compile reached its recompile limit ({error}); "
                        f"this param group's update runs eagerly"
                    )
                elif _is_compiler_failure(error):
                    self._eager = True
                    self._warn_once(f"torch.compile failed ({type(error).__name__}: {error}); "
                                    f"shardoptim runs the foreach implementation instead")
                else:
                    raise
        run_eager(self._update, params, grads, states, h, c)

    def _run_compiled(self, params, grads, states, h: GroupView, c: Any) -> None:
        if self._kernel is None:
            self._kernel = torch.compile(self._update, dynamic=True, fullgraph=True)
        frozen_h = types.SimpleNamespace(
            **{k: v for k, v in h._group.items() if k not in _GROUP_ENTRIES_NOT_HYPERPARAMETERS}
        )
        device, dtype = params[0].device, params[0].dtype
        tensor_c = types.SimpleNamespace(
            **{name: self._as_tensor(name, value, device, dtype) for name, value in vars(c).items()}
        )
        for i, (p, g) in enumerate(zip(params, grads)):
            s = types.SimpleNamespace(**{name: tensors[i] for name, tensors in states.items()})
            self._kernel(p, g, s, frozen_h, tensor_c)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _as_tensor(self, name: str, value: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """Numbers become reused 0-D tensors refilled in place; flags stay Python values."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        key = (device, dtype, name)
        tensor = self._scalar_tensors.get(key)
        if tensor is None:
            tensor = self._scalar_tensors[key] = torch.empty((), device=device, dtype=dtype)
        return tensor.fill_(value)


def _is_recompile_limit(error: Exception) -> bool:
    import torch._dynamo.exc

    limit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None)
    return limit is not None and isinstance(error, limit)


def _is_compiler_failure(error: Exception) -> bool:
    import torch._dynamo.exc
    import torch._inductor.exc

    failures = tuple(
        kind
        for kind in (
            getattr(torch._dynamo.exc, "BackendCompilerFailed", None),
            getattr(torch._inductor.exc, "InductorError", None),
            getattr(torch._inductor.exc, "CppCompileError", None),
        )
        if kind is not None
    )
    return isinstance(error, failures)
