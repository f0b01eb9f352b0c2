"""A rule's own update compiled into one kernel: the fused implementation where torch has none.

The same ``update(p, g, s, h, c)`` that runs eagerly is handed to ``torch.compile`` once per rule.
Per-step numbers travel as 0-D tensors that are refilled in place, and the compiled graph treats
tensor sizes as dynamic, so neither the step count, a scheduler's new learning rate nor a bucket of
another size recompiles it. Flags (``maximize``, ``amsgrad``, ...) and constant hyper-parameters are
part of the graph: a group with other flags compiles once more.
"""

from __future__ import annotations

import functools
import logging
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .rule import UpdateRule
from .tensorlist import run_eager

logger = logging.getLogger(__name__)


class CompiledUpdate:
    """An ``UpdateRule``'s ``update`` compiled with ``torch.compile``, run on whole flat shards.

    A step where only some parameters have gradients runs the foreach implementation over their
    views instead (see ``dispatch``): views of one buffer at many offsets would make the compiler
    specialise on each, for a path that is rare by nature. If compilation fails (no C++ compiler, an
    unsupported platform), it warns once and runs the same update eagerly from then on, never an
    error; a group whose flags or constants exceed torch.compile's recompile limit runs eagerly.
    """

    def __init__(self, update: Callable[..., None], *, exact_casts: bool = False) -> None:
        self._update = update
        self._exact_casts = exact_casts
        self._kernel: Callable[..., None] | None = None
        self._eager = False
        self._warned = False
        self._scalar_tensors: dict[tuple[torch.device, torch.dtype, str], Tensor] = {}

    def __call__(self, p: Tensor, g: Tensor, states: dict[str, Tensor], h: Any, c: Any) -> None:
        if not self._eager:
            try:
                self._run_compiled(p, g, states, h, c)
                return
            except Exception as error:  # noqa: BLE001 - compiler failures fall back, as documented
                if _is_recompile_limit(error):
                    self._warn_once(f"torch.compile reached its recompile limit ({error}); "
                                    f"this param group's update runs eagerly")
                elif _is_compiler_failure(error):
                    self._eager = True
                    self._warn_once(f"torch.compile failed ({type(error).__name__}: {error}); "
                                    f"shardoptim runs the foreach implementation instead")
                else:
                    raise
        run_eager(self._update, [p], [g], {name: [t] for name, t in states.items()}, h, c)

    def _run_compiled(self, p: Tensor, g: Tensor, states: dict[str, Tensor], h: Any, c: Any) -> None:
        if self._kernel is None:
            # Inductor otherwise skips the rounding of a value cast down and used in the same kernel.
            options = {"emulate_precision_casts": True} if self._exact_casts else None
            self._kernel = torch.compile(self._update, dynamic=True, fullgraph=True, options=options)
        # The numbers take the dtype the update computes in: the state's, wider than p's under state_dtype.
        dtype = next(iter(states.values()), p).dtype
        tensor_c = types.SimpleNamespace(
            **{name: self._as_tensor(name, value, p.device, dtype) for name, value in vars(c).items()}
        )
        self._kernel(p, g, types.SimpleNamespace(**states), types.SimpleNamespace(**vars(h)), tensor_c)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=5)

    def _as_tensor(self, name: str, value: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """Numbers become reused 0-D tensors refilled in place; flags stay Python values."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        key = (device, dtype, name)
        tensor = self._scalar_tensors.get(key)
        if tensor is None:
            tensor = self._scalar_tensors[key] = torch.empty((), device=device, dtype=dtype)
        return tensor.fill_(value)


@functools.cache
def compiled_form(rule: UpdateRule) -> CompiledUpdate:
    """The one compiled form of ``rule``'s update, shared by every optimizer using the rule."""
    return CompiledUpdate(rule.update, exact_casts=rule.exact_casts)


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
