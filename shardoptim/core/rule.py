"""``UpdateRule``: an algorithm as the base optimizer sees it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .hparams import Check


class GroupView:
    """Attribute access to a param group's hyper-parameters: ``h.lr`` reads ``group["lr"]``."""

    __slots__ = ("_group",)

    def __init__(self, group: Mapping[str, Any]) -> None:
        self._group = group

    def __getattr__(self, key: str) -> Any:
        try:
            return self._group[key]
        except KeyError:
            raise AttributeError(key) from None


def _no_scalars(h: GroupView, step: int) -> None:
    return None


@dataclass(frozen=True)
class UpdateRule:
    """Everything the base optimizer needs to run one algorithm on flat buckets.

    ``update(p, g, s, h, c)`` is the algorithm's math, written once against the Tensor API: ``p`` and
    ``g`` are a parameter and its gradient, ``s`` a namespace of state tensors named as in torch,
    ``h`` the group's hyper-parameters (a ``GroupView``) and ``c`` the per-step scalars returned by
    ``scalars(h, step)``. ``p``, ``g`` and ``s.*`` may be single tensors (one parameter or a whole flat
    shard) or ``TensorList``s; the math must not care which.

    ``state(h)`` names the per-element state tensors and the value each starts at. ``fused``, when
    given, is a kernel taking lists: ``fused(params, grads, states, steps, h, step)`` where ``states``
    maps each state name to a list and ``steps`` holds 0-D step tensors already incremented.

    ``scalar_state``, when given, declares per-parameter scalars that torch keeps as 0-D state tensors
    next to ``step`` (ASGD's ``eta`` and ``mu``, NAdam's ``mu_product``): ``scalar_state(h, step,
    **previous)`` is their value once a parameter has taken ``step`` updates under the group ``h``
    (``step`` 0: the value they start at). ``previous`` holds their values after ``step - 1`` updates
    when the base has them (every refresh after an update), so a value may accumulate over steps
    whose hyper-parameters differed (NAdam's running product); it is empty at step 0 and when values
    missing from a loaded state dict are derived. The base keeps one value per parameter in its
    bucket, refreshes it after each of that parameter's updates with the group as it is then (so a
    new ``lr`` takes effect one step later, as in torch), shows it in ``state[p]`` and
    ``state_dict()`` and passes the values from before an update on as keyword arguments:
    ``scalars(h, step, **values)`` and ``fused(..., h, step, **values)``.
    """

    checks: tuple[Check, ...]
    state: Callable[[GroupView], dict[str, float]]
    update: Callable[..., None]
    scalars: Callable[[GroupView, int], Any] = _no_scalars
    fused: Callable[..., None] | None = None
    #: torch keeps a per-parameter ``step`` tensor in this algorithm's state.
    step_in_state: bool = True
    scalar_state: Callable[..., dict[str, float]] | None = None
