"""``differentiable=True``: the rule's own update, run per parameter inside the autograd graph.

Meta-learning and hyper-gradient methods differentiate through ``step()``: the parameters may be
non-leaf tensors, the state may require grad, and so may hyper-parameters given as tensors (a tensor
``lr``). Such a group is not packed into flat buckets; it keeps torch's per-parameter ``state`` and
runs the same ``update(p, g, s, h, c)`` as every other implementation, on tensors wrapped in
``Tracked``. Tensor methods accept Python numbers only for ``alpha=`` and ``value=``; ``Tracked`` turns
a tensor given there into a product with the operand, so the graph reaches it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .rule import HyperParams, UpdateRule
from .shard_state import initial_fill, scalar_dtype

#: Methods whose scalar keyword multiplies one tensor operand: (keyword, position of that operand).
_SCALED = {
    "add": ("alpha", 0), "add_": ("alpha", 0), "sub": ("alpha", 0), "sub_": ("alpha", 0),
    "addcmul": ("value", 0), "addcmul_": ("value", 0), "addcdiv": ("value", 0), "addcdiv_": ("value", 0),
}


def _unwrap(value: Any) -> Any:
    return value.read() if isinstance(value, Tracked) else value


class Tracked:
    """A tensor whose ``alpha=``/``value=`` arguments may be tensors that require grad, and whose
    in-place methods keep every tensor autograd saved intact.

    The parameter and the optimizer state (``copy_on_read``) are updated in place, as torch does, but
    every other use of them reads a copy, so no graph saves a tensor that this step or the next
    changes. Everything else (the gradient, and every
    result) is a value: its in-place methods run out of place and rebind, since the update's
    temporaries are often results that autograd saved (``sqrt()``'s output, say).
    """

    __slots__ = ("tensor", "copy_on_read")

    def __init__(self, tensor: Tensor, *, copy_on_read: bool = False) -> None:
        self.tensor = tensor
        self.copy_on_read = copy_on_read

    def read(self) -> Tensor:
        return self.tensor.clone() if self.copy_on_read else self.tensor

    def __getattr__(self, name: str) -> Any:
        mutating = name.endswith("_") and not name.endswith("__")
        out_of_place = mutating and not self.copy_on_read and hasattr(self.tensor, name[:-1])
        target = self.tensor if mutating else self.read()
        attribute = getattr(target, name[:-1] if out_of_place else name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            args = [_unwrap(arg) for arg in args]
            kwargs = {key: _unwrap(value) for key, value in kwargs.items()}
            scaled = _SCALED.get(name)
            if scaled is not None and isinstance(kwargs.get(scaled[0]), Tensor):
                keyword, operand = scaled
                args[operand] = args[operand] * kwargs.pop(keyword)
            result = attribute(*args, **kwargs)
            if out_of_place:
                self.tensor = result
                return self
            if result is self.tensor:
                return self
            return Tracked(result) if isinstance(result, Tensor) else result

        return call

    def _binary(self, op: Callable[[Any, Any], Any], other: Any) -> Tracked:
        return Tracked(op(self.read(), _unwrap(other)))

    def __neg__(self) -> Tracked:
        return Tracked(-self.read())

    def __add__(self, other: Any) -> Tracked:
        return self._binary(lambda a, b: a + b, other)

    def __radd__(self, other: Any) -> Tracked:
        return self._binary(lambda a, b: b + a, other)

    def __sub__(self, other: Any) -> Tracked:
        return self._binary(lambda a, b: a - b, other)

    def __rsub__(self, other: Any) -> Tracked:
        return self._binary(lambda a, b: b - a, other)

    def __mul__(self, other: Any) -> Tracked:
        return self._binary(lambda a, b: a * b, other)

    def __rmul__(self, other: Any) -> Tracked:
        return self._binary(lambda a, b: b * a, other)

    def __truediv__(self, other: Any) -> Tracked:
        return self._binary(lambda a, b: a / b, other)

    def __rtruediv__(self, other: Any) -> Tracked:
        return self._binary(lambda a, b: b / a, other)


def start_state(rule: UpdateRule, h: HyperParams, param: Tensor) -> dict[str, Any]:
    """A parameter's torch-format state before its first update: ``step`` 0, tensors at their initial value."""
    entry: dict[str, Any] = {}
    if rule.step_in_state:
        entry["step"] = torch.tensor(0.0, dtype=scalar_dtype())
    for name, value in rule.state(h).items():
        entry[name] = torch.full_like(param, initial_fill(value, param.dtype), memory_format=torch.preserve_format)
    if rule.scalar_state is not None:
        for name, value in rule.scalar_state(h, 0).items():
            entry[name] = torch.as_tensor(value, dtype=scalar_dtype()).clone()
    return entry


def step_parameter(
    rule: UpdateRule, group: dict[str, Any], param: Tensor, entry: dict[str, Any], inverse_scale: Tensor | None = None
) -> None:
    """One update of ``param`` (which has a dense ``.grad``, times ``1 / inverse_scale`` when given:
    torch.amp.GradScaler's, left to the step) and its torch-format ``entry``, under autograd."""
    h = HyperParams.of(group, keep_tensors=True)
    first = not entry
    if first:
        entry.update(start_state(rule, h, param))
    if rule.step_in_state:
        entry["step"] += 1
        step = int(entry["step"].item())
    else:
        # torch keeps no step for these (SGD): only a parameter's first update is told apart.
        step = 1 if first else 2
    if rule.scalar_state is None:
        c = rule.scalars(h, step)
    else:
        names = rule.scalar_state(h, 0)
        before = {name: entry[name] for name in names}
        after = rule.scalar_state(h, step, **before)
        for name, value in after.items():
            entry[name] = value if isinstance(value, Tensor) else torch.tensor(value, dtype=scalar_dtype())
        c = rule.scalars(h, step, before=before, after=after)
    p, g = param, param.grad if inverse_scale is None else param.grad * inverse_scale.to(param.grad.device)
    states = {name: entry[name] for name in rule.state(h)}
    if param.is_complex():
        p, g = torch.view_as_real(p), torch.view_as_real(g)
        states = {name: torch.view_as_real(t) for name, t in states.items()}
    s = types.SimpleNamespace(**{name: Tracked(t, copy_on_read=True) for name, t in states.items()})
    rule.update(Tracked(p, copy_on_read=True), Tracked(g), s, h, c)
