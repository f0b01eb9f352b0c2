"""Noticing whether an optimizer has stepped, by the same protocol as torch's schedulers.

Stepping the scheduler before the optimizer silently skips the first value of a schedule, so a
scheduler warns about it at its first ``step()``. To know, torch's schedulers replace the
optimizer's ``step`` on the instance by a wrapper marked ``_wrapped_by_lr_sched`` that sets
``optimizer._opt_called = True`` when it runs. Ours use those two names too: a torch scheduler and
ours on one optimizer wrap it once and read the same flag, so neither misreads the other's wrapper
as a replaced ``step``. A ``step`` without the mark at a scheduler's first step means it was
replaced after the scheduler was created.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

WRAPPED_MARK = "_wrapped_by_lr_sched"  # set on the wrapper that replaces ``optimizer.step``
STEPPED_FLAG = "_opt_called"  # set on the optimizer once the wrapper has run


def _owner_of(optimizer: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(optimizer)
    except TypeError:  # not weak-referenceable: hold it strongly
        return lambda: optimizer


def _counting_wrapper(optimizer: Any) -> Callable[..., Any]:
    step = optimizer.step
    owner = _owner_of(optimizer)
    if getattr(step, "__self__", None) is optimizer and hasattr(step, "__func__"):
        # Rebind at call time instead of keeping the bound method: no optimizer -> step -> optimizer cycle.
        unbound = step.__func__

        @functools.wraps(unbound)
        def counted_step(*args: Any, **kwargs: Any) -> Any:
            opt = owner()
            setattr(opt, STEPPED_FLAG, True)
            return unbound(opt, *args, **kwargs)

    else:

        @functools.wraps(step)
        def counted_step(*args: Any, **kwargs: Any) -> Any:
            setattr(owner(), STEPPED_FLAG, True)
            return step(*args, **kwargs)

    setattr(counted_step, WRAPPED_MARK, True)
    return counted_step


def count_steps(optimizer: Any) -> bool:
    """Wrap ``optimizer.step`` to flag its calls, unless a scheduler (ours or torch's) already did.

    Returns False when the steps cannot be counted: ``optimizer`` has no ``step``, or refuses the
    wrapper (an object without instance attributes).
    """
    step = getattr(optimizer, "step", None)
    if step is None:
        return False
    if hasattr(step, WRAPPED_MARK):
        return True
    try:
        optimizer.step = _counting_wrapper(optimizer)
    except (AttributeError, TypeError):
        return False
    return True


def step_is_wrapped(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` is still a scheduler's counting wrapper."""
    return hasattr(optimizer.step, WRAPPED_MARK)


def has_stepped(optimizer: Any) -> bool:
    """Whether ``optimizer`` has stepped through a counting wrapper."""
    return bool(getattr(optimizer, STEPPED_FLAG, False))
