"""``state_dtype``: optimizer state, and a master copy of the parameters, wider than the parameters.

A model kept in bfloat16 or float16 trains badly with state in its own dtype: an update smaller than
half a unit in the last place of a weight rounds away, step after step. With ``state_dtype`` (say
float32) a bucket of narrower parameters keeps every state tensor in that dtype, plus one more,
``master_param``: this rank's shard of the parameters in ``state_dtype``. The update runs on the
master, from the gradient upcast; the parameters then hold the master rounded to their dtype.

The rule of such a bucket is :func:`master_rule` of the algorithm's: the same math, written once, run
on the master. Its update also notices a parameter written from outside the optimizer since the last
step (``model.load_state_dict``, an in-place edit under ``no_grad``): where a parameter no longer
holds its master rounded, the master restarts from the parameter.

torch's fused kernels take one dtype for parameters, gradients and state, so such a rule has none:
fused, it runs compiled: the upcast, the update and the rounding back in one kernel (one CPU core
here, AdamW over 4M elements: 6.0 ms, against 3.6 ms for torch's fused kernel over float32
parameters, and 19 ms for that kernel run on the master between eager casts).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from .rule import HyperParams, UpdateRule

#: The state name of the master copy of the parameters.
MASTER = "master_param"


def check_state_dtype(state_dtype: object) -> None:
    """Raise unless ``state_dtype`` is None or a real floating point ``torch.dtype``."""
    if state_dtype is None:
        return
    if not isinstance(state_dtype, torch.dtype):
        raise TypeError(f"state_dtype must be a torch.dtype or None, got {state_dtype!r}")
    if not state_dtype.is_floating_point:
        raise ValueError(
            f"state_dtype must be a floating point dtype such as torch.float32, got state_dtype={state_dtype}"
        )


def _holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every value of ``narrow`` is a value of ``wide`` (float16 and bfloat16: neither holds the other)."""
    w, n = torch.finfo(wide), torch.finfo(narrow)
    return w.eps <= n.eps and w.max >= n.max and w.smallest_normal <= n.smallest_normal


def state_dtype_for(param_dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a bucket of ``param_dtype`` parameters keeps its state in under ``state_dtype``.

    None, or the parameters' own precision, changes nothing. A complex bucket's state is complex of
    ``state_dtype``. Raises ``ValueError`` when ``state_dtype`` cannot hold every parameter value.
    """
    if state_dtype is None or not (param_dtype.is_floating_point or param_dtype.is_complex):
        return param_dtype
    real = param_dtype.to_real() if param_dtype.is_complex else param_dtype
    if not _holds(state_dtype, real):
        raise ValueError(
            f"state_dtype={state_dtype} is narrower than the parameters' {param_dtype}: the state must hold "
            f"every parameter value exactly (pass a dtype at least as wide, or None)"
        )
    if state_dtype == real:
        return param_dtype
    return state_dtype.to_complex() if param_dtype.is_complex else state_dtype


def follow_outside_writes(p, m) -> None:
    """Where ``p`` no longer holds ``m`` rounded to its dtype, ``p`` was written from outside the
    optimizer: ``m`` restarts from ``p`` there. (Right after a step, ``p`` is ``m`` rounded everywhere.)"""
    m.copy_(m.where(m.type_as(p).eq(p), p.type_as(m)))


@functools.cache
def master_rule(rule: UpdateRule) -> UpdateRule:
    """``rule`` run on a master copy of the parameters: the rule of a bucket that keeps one.

    Its state is ``rule``'s plus ``MASTER``. Its update, on ``p`` (the parameters), ``g`` (their
    gradient) and the state, all as the base optimizer passes them, follows outside writes to ``p``,
    runs ``rule``'s update on the master from ``g`` upcast to the master's dtype, and writes the master
    rounded back into ``p``. It has no torch kernel (see the module's docstring).
    """
    def state(h: HyperParams) -> dict[str, float]:
        # (The master starts as a copy of the parameters, not at this value: see ShardState.)
        return {**rule.state(h), MASTER: 0.0}

    def update(p, g, s, h, c) -> None:
        m = getattr(s, MASTER)
        follow_outside_writes(p, m)
        rule.update(m, g.type_as(m), s, h, c)
        p.copy_(m)

    # torch.compile keeps its graphs, and its limit of recompilations, per code object: every rule's
    # update through a master gets a code object of its own, or a few algorithms would exhaust the limit.
    update.__code__ = update.__code__.replace(co_name=f"{rule.update.__module__}.{rule.update.__name__}_on_master")

    sparse_update = None
    if rule.sparse_update is not None:
        def sparse_update(p, g, s, h, c) -> None:
            m = getattr(s, MASTER)
            follow_outside_writes(p, m)
            rule.sparse_update(m, g.to(m.dtype), s, h, c)
            p.copy_(m)

    return replace(rule, state=state, update=update, kernel=None, sparse_update=sparse_update, exact_casts=True)

