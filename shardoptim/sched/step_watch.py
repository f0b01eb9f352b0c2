"""Noticing whether an optimizer has stepped, so a scheduler stepped first can say so.

Stepping the scheduler before the optimizer silently skips the first value of a schedule. To warn
about it a scheduler must learn when the optimizer steps. An optimizer with
``register_step_post_hook`` (every ``torch.optim.Optimizer``, ours included) gets a post-step hook;
any other object with a ``step`` gets that method wrapped on the instance. Either way one marker
per optimizer is set, however many schedulers drive it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

# Attribute names set on the optimizer; prefixed so they cannot collide with torch's or a user's.
_HOW = "_shardoptim_sched_watch"  # "hook" or "wrapper": how this optimizer's steps are noticed
_STEPPED = "_shardoptim_sched_stepped"  # True once the optimizer has stepped
_WRAPPED = "_shardoptim_sched_counts_steps"  # marks our wrapper around ``optimizer.step``


def _record_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    setattr(optimizer, _STEPPED, True)


def _owner_of(optimizer: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(optimizer)
    except TypeError:  # not weak-referenceable: hold it strongly
        return lambda: optimizer


def _wrap_step(optimizer: Any) -> None:
    step = optimizer.step
    owner = _owner_of(optimizer)
    if getattr(step, "__self__", None) is optimizer and hasattr(step, "__func__"):
        # Rebind at call time instead of keeping the bound method: no optimizer -> step -> optimizer cycle.
        unbound = step.__func__

        @functools.wraps(unbound)
        def counted_step(*args: Any, **kwargs: Any) -> Any:
            opt = owner()
            setattr(opt, _STEPPED, True)
            return unbound(opt, *args, **kwargs)

    else:

        @functools.wraps(step)
        def counted_step(*args: Any, **kwargs: Any) -> Any:
            setattr(owner(), _STEPPED, True)
            return step(*args, **kwargs)

    setattr(counted_step, _WRAPPED, True)
    optimizer.step = counted_step


def watch_steps(optimizer: Any) -> None:
    """Start noticing ``optimizer``'s steps (idempotent; does nothing for an object without ``step``)."""
    if getattr(optimizer, _HOW, None) is not None:
        return
    try:
        if callable(getattr(optimizer, "register_step_post_hook", None)):
            optimizer.register_step_post_hook(_record_step)
            setattr(optimizer, _HOW, "hook")
        elif callable(getattr(optimizer, "step", None)):
            _wrap_step(optimizer)
            setattr(optimizer, _HOW, "wrapper")
    except AttributeError:  # an object that refuses new attributes cannot be watched
        return


def is_watched(optimizer: Any) -> bool:
    """Whether ``watch_steps`` could attach to ``optimizer``."""
    return getattr(optimizer, _HOW, None) is not None


def has_stepped(optimizer: Any) -> bool:
    """Whether ``optimizer`` has completed a step since it was first watched."""
    return bool(getattr(optimizer, _STEPPED, False))


def step_was_replaced(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` was reassigned after our wrapper went on (wrapped optimizers only)."""
    if getattr(optimizer, _HOW, None) != "wrapper":
        return False
    return not getattr(optimizer.step, _WRAPPED, False)
