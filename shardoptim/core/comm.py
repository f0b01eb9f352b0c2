"""Collectives an optimizer step needs, behind one small protocol.

``LocalComm`` is the world of one: every collective is a no-op, which is the single-process drop-in.
The process-group implementations live in :mod:`shardoptim.core.distributed`.

``rank`` and ``world_size`` are what the bucket layout is cut by: the shard this process owns and the
number of shards. A replicated optimizer (LBFGS, SparseAdam) talks to N ranks but owns everything, so
it presents ``rank=0, world_size=1`` to the layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from .bucket import FlatBucket

#: How per-rank partial results of a gradient norm combine: a sum of powers, or a maximum.
NormReduction = Literal["sum", "max"]


class Comm(Protocol):
    """The step's communication. Every method is collective: call it on every rank, same buckets."""

    rank: int
    world_size: int
    #: Largest bucket (in elements) the layout should plan, or None for one bucket per group/dtype/device.
    bucket_cap_numel: int | None

    def check_same_params(self, signature: str, counts: Sequence[int]) -> None:
        """Raise ``ValueError`` on every rank unless all ranks passed equal ``signature`` and ``counts``."""

    def agree_on_grads(self, buckets: Sequence[FlatBucket], ready: list[list[int]]) -> list[list[int]]:
        """Per bucket, the positions that have a gradient on any rank (``ready`` holds this rank's).

        Slots without a gradient here have their part of ``flat_grad`` zeroed first, so they add
        nothing to the average.
        """

    def average_grads(self, buckets: Sequence[FlatBucket]) -> None:
        """Leave in each bucket's ``shard_grad`` the average over ranks of that shard of ``flat_grad``."""

    def gather_params(self, buckets: Sequence[FlatBucket]) -> None:
        """Fill every rank's ``flat_param`` with every rank's ``shard_param``."""

    def update_pipeline(
        self, buckets: Sequence[FlatBucket], ready: list[list[int]], *, average_grads: bool
    ) -> Iterator[tuple[FlatBucket, list[int]]]:
        """Yield ``(bucket, positions)`` for every bucket with work, once its shard's gradient is final.

        The caller updates the bucket's shard before asking for the next one; its parameters are then
        gathered while later buckets are updated. When the iterator is exhausted every ``flat_param``
        is complete. With ``average_grads`` the gradients are averaged on the way (``average_grads``).
        """

    def reduce_norm(self, value: Tensor, how: NormReduction) -> Tensor:
        """Combine this rank's partial norm (0-D) with every other rank's; returns the combined value."""

    def mean_over_ranks(self, value: float) -> float:
        """The mean of ``value`` over ranks (a loss that decides a replicated algorithm's next move)."""

    def average_sparse_grads(self, params: Sequence[Tensor]) -> None:
        """Replace each parameter's sparse ``.grad`` by its average over ranks (rows: the union).

        A parameter with a gradient on some rank gets one on every rank; one without anywhere keeps None.
        """

    def gather_shards(self, fulls: Sequence[Tensor], shards: Sequence[Tensor], *, dst: int | None) -> None:
        """Fill each ``fulls[i]`` (a bucket-sized flat tensor) with every rank's ``shards[i]``.

        ``dst=None`` fills it on every rank; otherwise only on group rank ``dst`` (the others' ``fulls``
        are left as they were).
        """


class LocalComm:
    """A world of one rank: nothing to exchange."""

    rank = 0
    world_size = 1
    bucket_cap_numel = None

    def check_same_params(self, signature: str, counts: Sequence[int]) -> None:
        return None

    def agree_on_grads(self, buckets: Sequence[FlatBucket], ready: list[list[int]]) -> list[list[int]]:
        return ready

    def average_grads(self, buckets: Sequence[FlatBucket]) -> None:
        return None

    def gather_params(self, buckets: Sequence[FlatBucket]) -> None:
        return None

    def update_pipeline(
        self, buckets: Sequence[FlatBucket], ready: list[list[int]], *, average_grads: bool
    ) -> Iterator[tuple[FlatBucket, list[int]]]:
        return ((bucket, positions) for bucket, positions in zip(buckets, ready) if positions)

    def reduce_norm(self, value: Tensor, how: NormReduction) -> Tensor:
        return value

    def mean_over_ranks(self, value: float) -> float:
        return value

    def average_sparse_grads(self, params: Sequence[Tensor]) -> None:
        return None

    def gather_shards(self, fulls: Sequence[Tensor], shards: Sequence[Tensor], *, dst: int | None) -> None:
        for full, shard in zip(fulls, shards):
            if full.data_ptr() != shard.data_ptr():
                full.copy_(shard)

