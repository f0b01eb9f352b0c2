"""``TensorRule``: a matrix algorithm as the base optimizer sees it, every parameter updated whole.

Muon orthogonalises each matrix's update; Adafactor factors each matrix's second moment into a row
and a column vector and scales by norms of the whole tensor. Cut across ranks, as flat partitions
cut elementwise algorithms, a matrix would be updated wrongly, so these algorithms get whole-tensor
partitions (``plan_tensor_buckets``): each parameter belongs to one rank, which keeps its state in
torch's per-parameter format and updates it; the bucket's gather then brings every rank the updated
parameters in one collective per bucket, as for elementwise algorithms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .rule import HyperParams

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorRule:
    """Everything the base optimizer needs to run one matrix algorithm.

    ``init_state(p, h)`` is torch's state of parameter ``p`` at its first update (tensors shaped as
    torch shapes them; ``scalar_names`` the 0-D CPU tensors among them, in torch's scalar dtype).
    ``update(p, g, state, h)`` is one step of one parameter, in place: ``p`` is the parameter (a view
    of its bucket), ``g`` its averaged gradient (read only), ``state`` its entry of
    ``optimizer.state``. ``state_shapes(shape)`` names the non-scalar state tensors of a parameter of
    ``shape`` and their shapes (what a gather of owned state allocates, and what memory reports
    count). ``cost(shape)`` is the relative cost of one update, what ranks are balanced on.
    """

    init_state: Callable[[Tensor, HyperParams], dict[str, Any]]
    update: Callable[[Tensor, Tensor, dict[str, Any], HyperParams], None]
    state_shapes: Callable[[Shape], dict[str, Shape]]
    cost: Callable[[Shape], float]
    scalar_names: tuple[str, ...] = ()

    def state_numel(self, shape: Shape) -> int:
        """Elements of the non-scalar state of one parameter of ``shape``."""
        return sum(math.prod(s) for s in self.state_shapes(shape).values())
