"""What a bucket's step needs from the ranks it shares the work with, behind one small protocol.

Three collectives, each launched and waited separately so the step can overlap them with work:
averaging a flat gradient into a shard of it, gathering shards into the flat buffer, and reducing a
small tensor (masks, norms). ``LocalComm`` is the world of one: every collective is nothing to do,
which is the single-process drop-in. The process-group implementation is in
:mod:`shardoptim.core.distributed`.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

#: How per-rank values of a small tensor combine.
Reduction = Literal["sum", "max"]

#: Per rank, the ``[start, stop)`` range of a flat buffer it owns (``BucketLayout.bounds``); None:
#: equal ranges in rank order.
Bounds = tuple[tuple[int, int], ...] | None


class Pending(Protocol):
    """A collective in flight; ``wait()`` returns once its results are in place."""

    def wait(self) -> None: ...


class Done:
    """A collective that had nothing to do."""

    def wait(self) -> None:
        return None


DONE = Done()


class Comm(Protocol):
    """The collectives of a step. Every launch is collective: call it on every rank in the same order."""

    #: This process's rank in the group, and the group's size.
    rank: int
    world_size: int
    #: Where small tensors (masks, norms) are reduced without a device round trip where possible.
    small_device: torch.device

    def launch_average(self, flat: Tensor, shard: Tensor, *, bounds: Bounds = None, label: str = "") -> Pending:
        """Average ``flat`` over ranks into ``shard``.

        ``shard`` is either ``flat`` itself (a replicated buffer: the whole of it is averaged) or a
        buffer the size of this rank's range, which may be that range of ``flat`` itself, that
        receives the average of that range. Ranges are ``bounds`` (uneven ones for whole-tensor
        partitions), or ``flat.numel() // world_size`` elements each. The rest of ``flat`` is left
        undefined.

        ``label`` (every launch takes one) names the collective in the error raised if it fails or
        times out (``ShardingConfig.collective_timeout_s``).
        """

    def launch_gather(
        self, flat: Tensor, shard: Tensor, *, bounds: Bounds = None, dst: int | None = None, label: str = ""
    ) -> Pending:
        """Fill ``flat`` with every rank's ``shard`` (its range, as in ``launch_average``), on every
        rank or only on ``dst``.

        ``shard`` is ``flat``'s own slice, a separate buffer of that size, or ``flat`` itself (nothing
        to gather). With ``dst``, ``flat`` matters only on ``dst`` (elsewhere it may be empty).
        """

    def launch_reduce(self, tensor: Tensor, how: Reduction, *, label: str = "") -> Pending:
        """Combine a tensor over ranks, in place: small ones (masks, norms, losses), and sparse
        gradients (``"sum"``: the union of the ranks' entries)."""


class LocalComm:
    """A world of one rank: nothing to exchange."""

    rank = 0
    world_size = 1
    small_device = torch.device("cpu")

    def launch_average(self, flat: Tensor, shard: Tensor, *, bounds: Bounds = None, label: str = "") -> Pending:
        if shard.data_ptr() != flat.data_ptr():
            shard.copy_(flat[: shard.numel()])
        return DONE

    def launch_gather(
        self, flat: Tensor, shard: Tensor, *, bounds: Bounds = None, dst: int | None = None, label: str = ""
    ) -> Pending:
        if shard.data_ptr() != flat.data_ptr():
            flat[: shard.numel()].copy_(shard)
        return DONE

    def launch_reduce(self, tensor: Tensor, how: Reduction, *, label: str = "") -> Pending:
        return DONE
