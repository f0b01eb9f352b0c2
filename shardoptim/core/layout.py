"""Flat bucket layout: where each parameter lives in which flat buffer, and which part a rank owns.

The layout is a pure function of the parameters' order, shapes, dtypes, devices and groups plus the
world size, bucket cap and alignment. It is plain data (``to_dict``/``from_dict``), so a checkpoint
can store it and resharding is "plan the layout for M ranks and remap".

Slot offsets never depend on the world size: only the padding at the end of a bucket does. A flat
buffer saved at one world size is therefore the same buffer at any other, cut at other points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Slot offsets are multiples of this many elements (64 bytes of float32), keeping every parameter
#: view aligned for vectorised kernels.
ALIGNMENT = 16


@dataclass(frozen=True)
class ParamSpec:
    """What the layout needs to know about one parameter."""

    index: int  # position in the optimizer's parameter order (torch's state_dict key)
    group: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(param: torch.Tensor, index: int, group: int) -> ParamSpec:
        return ParamSpec(index, group, tuple(param.shape), param.dtype, param.device)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a bucket: ``flat[offset : offset + numel].view(shape)``."""

    index: int
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Segment:
    """The part of a slot that falls inside one rank's shard, in shard coordinates."""

    slot: int  # position of the slot within its bucket
    start: int  # first element, relative to the shard
    stop: int
    param_start: int  # first element, relative to the parameter

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class BucketLayout:
    """One flat buffer of parameters sharing a param group, dtype and device."""

    group: int
    dtype: torch.dtype
    device: torch.device
    slots: tuple[Slot, ...]
    numel: int  # padded so that it divides evenly by world_size
    world_size: int

    @property
    def shard_numel(self) -> int:
        return self.numel // self.world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of the flat buffer that ``rank`` owns."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def segments(self, rank: int) -> tuple[Segment, ...]:
        """The slots (or parts of slots) inside ``rank``'s shard, in order."""
        lo, hi = self.shard_range(rank)
        found = []
        for position, slot in enumerate(self.slots):
            start, stop = max(slot.offset, lo), min(slot.end, hi)
            if start < stop:
                found.append(Segment(position, start - lo, stop - lo, start - slot.offset))
        return tuple(found)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "numel": self.numel,
            "world_size": self.world_size,
            "slots": [[s.index, s.offset, list(s.shape)] for s in self.slots],
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> BucketLayout:
        return BucketLayout(
            group=data["group"],
            dtype=getattr(torch, data["dtype"]),
            device=torch.device(data["device"]),
            slots=tuple(Slot(i, off, tuple(shape)) for i, off, shape in data["slots"]),
            numel=data["numel"],
            world_size=data["world_size"],
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_buckets(
    params: Sequence[ParamSpec],
    *,
    world_size: int = 1,
    bucket_cap_numel: int | None = None,
    alignment: int = ALIGNMENT,
) -> tuple[BucketLayout, ...]:
    """Pack parameters into flat buckets.

    Parameters are bucketed by (group, device, dtype) in order of first appearance, keeping their
    order inside a bucket; a bucket is closed when adding the next parameter would exceed
    ``bucket_cap_numel`` elements (a parameter larger than the cap gets a bucket of its own).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    opened: list[tuple[tuple[int, torch.device, torch.dtype], list[Slot]]] = []
    fill: list[int] = []
    open_bucket: dict[tuple[int, torch.device, torch.dtype], int] = {}

    for spec in params:
        key = (spec.group, spec.device, spec.dtype)
        b = open_bucket.get(key)
        if b is None or (bucket_cap_numel is not None and fill[b] + spec.numel > bucket_cap_numel and fill[b] > 0):
            b = open_bucket[key] = len(opened)
            opened.append((key, []))
            fill.append(0)
        opened[b][1].append(Slot(spec.index, fill[b], spec.shape))
        fill[b] = _round_up(fill[b] + spec.numel, alignment)

    return tuple(
        BucketLayout(
            group=group,
            dtype=dtype,
            device=device,
            slots=tuple(slots),
            numel=_round_up(max(used, 1), world_size * alignment),
            world_size=world_size,
        )
        for ((group, device, dtype), slots), used in zip(opened, fill)
    )
