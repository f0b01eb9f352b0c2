"""``ShardState``: the optimizer state one rank keeps for its shard of one bucket.

Per-element state (``exp_avg``, ...) is one flat tensor per name covering the shard. Per-parameter
numbers are one small CPU tensor per name with an entry per slot of the bucket, in torch's scalar
dtype (float32, or float64 when that is the default dtype), where torch keeps them: ``steps``, and
the scalar state some algorithms declare (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``). Every
rank keeps every slot's numbers (they are the same everywhere); ``state[p]`` exposes 0-D views of
them, as torch's state holds 0-D tensors. Reading them never waits for a device.

The per-element state is in the bucket's dtype, or in a wider one (``state_dtype``,
:mod:`shardoptim.core.master`), when it also holds ``master_param``, the shard's parameters in that
dtype: the one state tensor that starts as a copy of the parameters rather than at a number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .layout import BucketLayout, Segment
from .master import MASTER


def scalar_dtype() -> torch.dtype:
    """The dtype torch keeps ``step`` in: float64 when that is the default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class ShardState:
    """Named flat state tensors for this rank's shard of a bucket, plus per-slot step counts and scalars.

    ``dtype`` is the state tensors' dtype (the bucket's by default); ``params``, this rank's shard of
    the bucket's parameters, is what ``master_param`` starts from.
    """

    def __init__(
        self, layout: BucketLayout, rank: int, *, dtype: torch.dtype | None = None, params: Tensor | None = None
    ) -> None:
        self.layout = layout
        self.numel = layout.shard_numel(rank)
        self.dtype = layout.dtype if dtype is None else dtype
        self.params = params
        self.tensors: dict[str, Tensor] = {}
        self.steps = torch.zeros(len(layout.slots), dtype=scalar_dtype())
        self.scalars: dict[str, Tensor] = {}

    @property
    def keeps_master(self) -> bool:
        """Whether the state is wider than the parameters, and so holds ``master_param``."""
        return self.dtype != self.layout.dtype

    def allocate(self, initial: dict[str, float]) -> list[str]:
        """Create the named tensors that do not exist yet, filled with their initial values; their names."""
        created = [name for name in initial if name not in self.tensors]
        for name in created:
            if name == MASTER:
                self.tensors[name] = self.params.detach().to(self.dtype, copy=True)
            else:
                self.tensors[name] = torch.full(
                    (self.numel,), self._fill(initial[name]), dtype=self.dtype, device=self.layout.device
                )
        return created

    def reset(self, segment: Segment | None, initial: dict[str, float]) -> None:
        """Refill one parameter's part of the named tensors with their initial values."""
        if segment is None:
            return
        for name, value in initial.items():
            part = self.tensors[name][segment.start : segment.stop]
            if name == MASTER:
                part.copy_(self.params[segment.start : segment.stop])
            else:
                part.fill_(self._fill(value))

    def count_steps(self, positions: Sequence[int]) -> list[int]:
        """Add one update to each of ``positions``; return their new step counts."""
        if len(positions) == len(self.steps):
            self.steps.add_(1)
        else:
            self.steps[list(positions)] += 1
        counts = self.steps.long().tolist()
        return counts if len(positions) == len(counts) else [counts[position] for position in positions]

    def set_scalars(self, positions: Sequence[int], values: dict[str, Tensor | float]) -> None:
        """Store per-slot scalars of ``positions``; each name is allocated on first use."""
        for name, value in values.items():
            tensor = self.scalars.get(name)
            if tensor is None:
                tensor = self.scalars[name] = torch.zeros_like(self.steps)
            if len(positions) == len(self.steps):
                tensor.fill_(value)
            else:
                tensor[list(positions)] = value

    def scalars_at(self, position: int) -> dict[str, Tensor]:
        """One slot's scalar state as 0-D tensors (views)."""
        return {name: values[position] for name, values in self.scalars.items()}

    def view(self, name: str, segment: Segment) -> Tensor:
        """One parameter's part of a state tensor: shaped like the parameter when the rank owns all of it."""
        part = self.tensors[name][segment.start : segment.stop]
        slot = self.layout.slots[segment.slot]
        return part.view(slot.shape) if segment.numel == slot.numel else part

    def _fill(self, value: float) -> float | complex:
        return initial_fill(value, self.layout.dtype)


def initial_fill(value: float, dtype: torch.dtype) -> float | complex:
    """A state's initial ``value`` in ``dtype``: torch starts a complex state at complex(v, v)."""
    return complex(value, value) if dtype.is_complex else value
