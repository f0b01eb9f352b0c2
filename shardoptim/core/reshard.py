"""Mapping flat shards between layouts: which elements of which saved shard fill which part of a new one.

Two layouts of the same parameters (saved at world size N, loaded at world size M, or with other
bucket boundaries) agree on what matters: each parameter's elements in order. Every rank's shards
are therefore a list of (parameter, element range) pieces (``BucketLayout.segments``), and resharding
is the intersection of the pieces a target rank owns with the pieces each source rank owned. The
result tells a reader exactly which element ranges to read from which source shard, so nothing
else is read. Pure functions of the layouts: no tensors, no communication.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .layout import BucketLayout


@dataclass(frozen=True)
class Piece:
    """``numel`` elements of parameter ``index`` from element ``param_start``, at ``start`` of a shard."""

    index: int
    param_start: int
    bucket: int  # position of the bucket in its layout
    start: int  # first element, relative to the owning rank's shard of that bucket
    numel: int

    @property
    def param_stop(self) -> int:
        return self.param_start + self.numel


@dataclass(frozen=True)
class Copy:
    """Fill ``target_bucket``'s shard at ``target_start`` with ``numel`` elements of a source shard."""

    source_rank: int
    source_bucket: int
    source_start: int  # relative to the source rank's shard of ``source_bucket``
    target_bucket: int
    target_start: int  # relative to this rank's shard of ``target_bucket``
    numel: int


def owned_pieces(layouts: Sequence[BucketLayout], rank: int) -> list[Piece]:
    """Every (parameter, element range) that ``rank`` owns under ``layouts``, bucket by bucket."""
    pieces = []
    for position, layout in enumerate(layouts):
        for segment in layout.segments(rank):
            slot = layout.slots[segment.slot]
            pieces.append(Piece(slot.index, segment.param_start, position, segment.start, segment.numel))
    return pieces


def check_same_parameters(source: Sequence[BucketLayout], target: Sequence[BucketLayout]) -> None:
    """Raise ``ValueError`` unless both layouts hold the same parameters with the same shapes."""
    def table(layouts: Sequence[BucketLayout]) -> dict[int, tuple[int, ...]]:
        return {slot.index: slot.shape for layout in layouts for slot in layout.slots}

    saved, wanted = table(source), table(target)
    if saved.keys() != wanted.keys():
        missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
        raise ValueError(f"layouts hold different parameters: missing from the source {missing}, extra {extra}")
    for index, shape in wanted.items():
        if saved[index] != shape:
            raise ValueError(f"parameter {index} has shape {shape}, the source layout {saved[index]}")


def plan_copies(source: Sequence[BucketLayout], target: Sequence[BucketLayout], rank: int) -> list[Copy]:
    """The copies that fill ``rank``'s shards under ``target`` from the shards saved under ``source``.

    Together they cover every element ``rank`` owns that belongs to a parameter (padding is not
    covered), each exactly once; adjacent copies from the same source shard are merged. Raises
    ``ValueError`` when the layouts hold different parameters.
    """
    check_same_parameters(source, target)
    sources: dict[int, list[tuple[int, Piece]]] = defaultdict(list)
    for source_rank in range(source[0].world_size if source else 1):
        for piece in owned_pieces(source, source_rank):
            sources[piece.index].append((source_rank, piece))

    copies: list[Copy] = []
    for wanted in owned_pieces(target, rank):
        for source_rank, saved in sources[wanted.index]:
            start = max(wanted.param_start, saved.param_start)
            stop = min(wanted.param_stop, saved.param_stop)
            if start >= stop:
                continue
            copy = Copy(
                source_rank, saved.bucket, saved.start + start - saved.param_start,
                wanted.bucket, wanted.start + start - wanted.param_start, stop - start,
            )
            if copies and _adjacent(copies[-1], copy):
                copies[-1] = _merged(copies[-1], copy)
            else:
                copies.append(copy)
    return copies


def _adjacent(a: Copy, b: Copy) -> bool:
    return (
        (a.source_rank, a.source_bucket, a.target_bucket) == (b.source_rank, b.source_bucket, b.target_bucket)
        and a.source_start + a.numel == b.source_start
        and a.target_start + a.numel == b.target_start
    )


def _merged(a: Copy, b: Copy) -> Copy:
    return Copy(a.source_rank, a.source_bucket, a.source_start, a.target_bucket, a.target_start, a.numel + b.numel)
