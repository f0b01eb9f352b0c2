"""Collectives an optimizer step needs, behind one small protocol.

``LocalComm`` is the world of one: every collective is a no-op, which is the single-process drop-in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .bucket import FlatBucket


class Comm(Protocol):
    """The step's communication. Every method is collective: call it on every rank, same buckets."""

    rank: int
    world_size: int

    def average_grads(self, buckets: Sequence[FlatBucket]) -> None:
        """Leave in each bucket's ``shard_grad`` the average over ranks of that shard of ``flat_grad``."""

    def gather_params(self, buckets: Sequence[FlatBucket]) -> None:
        """Fill every rank's ``flat_param`` with every rank's ``shard_param``."""


class LocalComm:
    """A world of one rank: nothing to exchange."""

    rank = 0
    world_size = 1

    def average_grads(self, buckets: Sequence[FlatBucket]) -> None:
        return None

    def gather_params(self, buckets: Sequence[FlatBucket]) -> None:
        return None
