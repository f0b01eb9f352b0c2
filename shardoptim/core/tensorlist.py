"""A list of tensors that behaves like one tensor, so update rules are written once.

``TensorList`` maps tensor methods onto ``torch._foreach_*`` kernels where torch has them and onto a
per-tensor loop otherwise. An update rule written against the Tensor API therefore runs unchanged on
a single tensor (one parameter, or one flat bucket shard) and on a list of parameter views.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

# Tensor method -> foreach kernel. Everything else falls back to a per-tensor loop.
_FOREACH = {
    name: getattr(torch, f"_foreach_{name}")
    for name in (
        "abs", "add", "add_", "addcdiv_", "addcmul_", "clamp_max_", "clamp_min_", "copy_", "div", "div_",
        "exp", "exp_", "lerp_", "maximum_", "mul", "mul_", "neg", "neg_", "pow", "reciprocal",
        "reciprocal_", "sign", "sign_", "sqrt", "sqrt_", "sub", "sub_", "zero_",
    )
}


def _unwrap(value: Any) -> Any:
    return value.tensors if isinstance(value, TensorList) else value




class TensorList:
    """Tensor-like view of several tensors; arithmetic runs as one foreach kernel per operation.

    Operands may be another ``TensorList`` of the same length, a Python scalar, or a 0-D Tensor.
    In-place methods return ``self`` so chains such as ``s.mul_(b).addcmul_(g, g, value=1 - b)`` work.
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self.tensors = list(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.tensors)

    def __getitem__(self, index: int) -> Tensor:
        return self.tensors[index]

    def __repr__(self) -> str:
        return f"TensorList({len(self.tensors)} tensors)"

    def __getattr__(self, name: str) -> Any:
        in_place = name.endswith("_")
        kernel = _FOREACH.get(name)
        if kernel is not None:
            def call(*args: Any, **kwargs: Any) -> Any:
                result = kernel(self.tensors, *map(_unwrap, args), **kwargs)
                return self if in_place else TensorList(result)
        else:
            if not hasattr(Tensor, name):
                raise AttributeError(name)

            def call(*args: Any, **kwargs: Any) -> Any:
                per_tensor = [
                    getattr(t, name)(*(a[i] if isinstance(a, TensorList) else a for a in args), **kwargs)
                    for i, t in enumerate(self.tensors)
                ]
                return self if in_place else TensorList(per_tensor)
        return call

    def __neg__(self) -> TensorList:
        return self.neg()

    def __add__(self, other: Any) -> TensorList:
        return self.add(other)

    __radd__ = __add__

    def __sub__(self, other: Any) -> TensorList:
        return self.sub(other)

    def __rsub__(self, other: Any) -> TensorList:
        return self.neg().add_(other)

    def __mul__(self, other: Any) -> TensorList:
        return self.mul(other)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> TensorList:
        return self.div(other)

    def __rtruediv__(self, other: Any) -> TensorList:
        return self.reciprocal().mul_(other)


#: Elements per call when an update runs eagerly over one whole flat shard. Each temporary of the
#: update is then small enough to come from the allocator's cache rather than from fresh pages
#: (measured here, Adam over a 14M-element shard: 55 ms in one piece, 17 ms in 256K-element chunks).
EAGER_CHUNK_NUMEL = 1 << 18


def run_eager(
    update: Callable[..., None],
    params: list[Tensor],
    grads: list[Tensor],
    states: dict[str, list[Tensor]],
    h: Any,
    c: Any,
) -> None:
    """Run an elementwise ``update(p, g, s, h, c)`` eagerly: a single tensor in chunks, a list as a TensorList."""
    if len(params) == 1:
        names = list(states)
        pieces = [t.split(EAGER_CHUNK_NUMEL) for t in (params[0], grads[0], *(states[n][0] for n in names))]
        for p, g, *state in zip(*pieces):
            update(p, g, types.SimpleNamespace(**dict(zip(names, state))), h, c)
        return
    s = types.SimpleNamespace(**{name: TensorList(tensors) for name, tensors in states.items()})
    update(TensorList(params), TensorList(grads), s, h, c)
