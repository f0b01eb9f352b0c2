"""The step's collectives over a torch.distributed process group.

Which collectives move a bucket is a choice per backend and device, made once from the optimizer's
``ShardingConfig``: ``"auto"`` resolves to what measured fastest (``docs/distributed.md``), not to
the textbook. NCCL: reduce-scatter with ``ReduceOp.AVG``, then all-gather, the bytes of one
all-reduce. gloo (this project's 2-core CPUs, one thread per rank, one 56 MB float32 buffer, medians
of interleaved runs, ``python -m bench.dist --collectives``), 2 ranks: ``all_to_all_single`` + add
29 ms, ``all_reduce`` 60 ms, reduce-scatter 118 ms; one ``broadcast`` per owner 22 ms, all-gather
95 ms. 4 ranks (two per core): 155 / 137 / 277 ms and 64 / 200 ms.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from .alias import real_view
from .comm import DONE, Bounds, Pending, Reduction
from .config import ShardingConfig

logger = logging.getLogger(__name__)

# torch 2.13 renamed the single-tensor collectives (the old names warn); older releases have only those.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class CollectivePattern:
    """How one bucket moves between ranks: ``average`` and ``gather`` as in ``ShardingConfig``;
    ``average_op``: the backend divides inside the collective (``ReduceOp.AVG``)."""

    average: str
    gather: str
    average_op: bool = False


def backend_for(backend: str, device: torch.device) -> str:
    """The backend that moves tensors on ``device``; ``backend`` is what ``dist.get_backend`` returns,
    one name (``"gloo"``) or one per device type (``"cpu:gloo,cuda:nccl"``)."""
    if ":" not in backend:
        return backend
    by_device = dict(part.split(":", 1) for part in backend.split(","))
    return by_device.get(device.type, backend)


def resolve_pattern(config: ShardingConfig, backend: str) -> CollectivePattern:
    """The collectives ``config`` asks for on ``backend`` (one backend name), ``"auto"`` resolved."""
    fastest = {"nccl": ("reduce_scatter", "all_gather"), "gloo": ("all_to_all", "broadcast")}
    auto_average, auto_gather = fastest.get(backend, ("reduce_scatter", "all_gather"))
    average = auto_average if config.average == "auto" else config.average
    gather = auto_gather if config.gather == "auto" else config.gather
    return CollectivePattern(average, gather, average_op=backend == "nccl")


def _replicated(flat: Tensor, shard: Tensor, bounds: Bounds) -> bool:
    """Whether ``flat`` is a buffer every rank holds whole (``shard`` is all of it, and no bounds cut
    it: a whole-tensor partition's rank may own all of a bucket while its peers own nothing)."""
    return shard.numel() == flat.numel() and (bounds is None or len(bounds) == 1)


def _even(ranges: Sequence[tuple[int, int]]) -> bool:
    return len({stop - start for start, stop in ranges}) == 1


class CollectiveError(RuntimeError):
    """A collective of the step failed or timed out (a peer died, hung, or went elsewhere)."""


class _Works:
    """Collectives in flight, and what to do once they are done.

    ``label`` says what they are (which bucket, which step) in the error raised when one fails or
    exceeds ``timeout``, so a hung peer is reported instead of waited on forever.
    """

    __slots__ = ("_works", "_then", "label", "timeout")

    def __init__(self, works: Sequence[dist.Work], then=None) -> None:
        self._works, self._then = list(works), then
        self.label, self.timeout = "a collective", None

    def wait(self) -> None:
        try:
            for work in self._works:
                if self.timeout is None:
                    work.wait()
                else:
                    work.wait(self.timeout)
        except Exception as error:
            limit = f" within {self.timeout.total_seconds():g} s" if self.timeout is not None else ""
            raise CollectiveError(f"{self.label} did not complete{limit}: {error}") from error
        self._works = []
        if self._then is not None:
            then, self._then = self._then, None
            then()


class ProcessGroupComm:
    """``Comm`` over a process group, with the collectives ``config`` chooses for each backend."""

    def __init__(self, process_group: dist.ProcessGroup, config: ShardingConfig) -> None:
        if dist.is_available() and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (dist.group.WORLD, "
                            f"dist.new_group(...)), got {type(process_group).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group was given but torch.distributed is not initialized")
        # Held weakly: after dist.destroy_process_group() the group must go at once, not at interpreter
        # exit, where tearing down its threads late aborts the process.
        self._group = weakref.ref(process_group)
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the process_group it was given")
        self.backend = str(dist.get_backend(process_group))
        self.config = config
        self._timeout = None if config.collective_timeout_s is None else timedelta(seconds=config.collective_timeout_s)
        self._global_ranks = [dist.get_global_rank(process_group, rank) for rank in range(self.world_size)]
        self._patterns: dict[str, CollectivePattern] = {}
        # Small tensors (masks, norms) go where the backend takes them without a device round trip.
        cpu_capable = backend_for(self.backend, torch.device("cpu")) != "nccl"
        self.small_device = torch.device("cpu") if cpu_capable else torch.device("cuda", torch.cuda.current_device())

    @property
    def group(self) -> dist.ProcessGroup:
        group = self._group()
        if group is None:
            raise RuntimeError("the optimizer's process group was destroyed (dist.destroy_process_group())")
        return group

    def pattern(self, device: torch.device) -> CollectivePattern:
        pattern = self._patterns.get(device.type)
        if pattern is None:
            pattern = self._patterns[device.type] = resolve_pattern(self.config, backend_for(self.backend, device))
            logger.debug("collectives on %s: %s", device.type, pattern)
        return pattern

    # -- averaging ------------------------------------------------------------------------------

    def _labelled(self, works: _Works, label: str) -> _Works:
        works.label, works.timeout = label or works.label, self._timeout
        return works

    def launch_average(self, flat: Tensor, shard: Tensor, *, bounds: Bounds = None, label: str = "") -> Pending:
        replicated = _replicated(flat, shard, bounds)
        ranges = [] if replicated else self._ranges(flat, bounds)
        flat, shard = real_view(flat), real_view(shard)
        average = self.pattern(flat.device).average
        if replicated or average == "all_reduce":
            works = self._all_reduce_average(flat, shard, ranges, replicated)
        elif average == "all_to_all":
            works = self._all_to_all_average(flat, shard, ranges)
        elif _even(ranges):
            works = self._reduce_scatter_average(flat, shard)
        else:  # reduce-scatter takes equal ranges only: a whole-tensor partition's are uneven
            works = self._all_reduce_average(flat, shard, ranges)
        return self._labelled(works, label)

    def _ranges(self, flat: Tensor, bounds: Bounds) -> list[tuple[int, int]]:
        """Every rank's range of ``flat`` seen as real (complex elements count twice)."""
        scale = 2 if flat.is_complex() else 1
        if bounds is None:
            size = flat.numel() // self.world_size
            return [(rank * size * scale, (rank + 1) * size * scale) for rank in range(self.world_size)]
        return [(start * scale, stop * scale) for start, stop in bounds]

    def _all_reduce_average(
        self, flat: Tensor, shard: Tensor, ranges: list[tuple[int, int]], replicated: bool = False
    ) -> Pending:
        op = dist.ReduceOp.AVG if self.pattern(flat.device).average_op else dist.ReduceOp.SUM
        work = dist.all_reduce(flat, op=op, group=self.group, async_op=True)

        def finish() -> None:
            if op != dist.ReduceOp.AVG:
                flat.div_(self.world_size)
            if not replicated:
                start, stop = ranges[self.rank]
                if flat[start:stop].data_ptr() != shard.data_ptr():
                    shard.copy_(flat[start:stop])

        return _Works([work], finish)

    def _reduce_scatter_average(self, flat: Tensor, shard: Tensor) -> Pending:
        average_op = self.pattern(flat.device).average_op
        op = dist.ReduceOp.AVG if average_op else dist.ReduceOp.SUM
        work = reduce_scatter_single(shard, flat, op=op, group=self.group, async_op=True)
        return _Works([work], None if average_op else lambda: shard.div_(self.world_size))

    def _all_to_all_average(self, flat: Tensor, shard: Tensor, ranges: list[tuple[int, int]]) -> Pending:
        """Send range ``j`` of ``flat`` to rank ``j``, receive every other rank's copy of this rank's
        range, add them.

        The first and the last rank keep their own range out of the exchange (the ranges for the
        others are contiguous there; at 2 ranks that is every rank), which saves sending it to
        itself; a rank in the middle receives its own range too, and skips it.
        """
        world, rank = self.world_size, self.rank
        start, stop = ranges[rank]
        sending = [hi - lo for lo, hi in ranges]
        receiving = [stop - start] * world
        send = flat
        if rank in (0, world - 1):
            sending[rank] = receiving[rank] = 0
            send = flat[stop:] if rank == 0 else flat[:start]
        received = torch.empty(sum(receiving), dtype=flat.dtype, device=flat.device)
        own = flat[start:stop]
        work = dist.all_to_all_single(
            received, send, output_split_sizes=receiving, input_split_sizes=sending, group=self.group,
            async_op=True,
        )
        sources = [source for source in range(world) if receiving[source]]
        rows = dict(zip(sources, received.split([receiving[source] for source in sources])))
        others = [row for source, row in rows.items() if source != rank]

        def finish() -> None:
            if others:  # the first sum written straight into the shard: no separate copy of ``own``
                torch.add(own, others[0], out=shard)
            elif own.data_ptr() != shard.data_ptr():
                shard.copy_(own)
            for row in others[1:]:
                shard.add_(row)
            shard.div_(world)

        return _Works([work], finish)

    # -- gathering ------------------------------------------------------------------------------

    def launch_gather(
        self, flat: Tensor, shard: Tensor, *, bounds: Bounds = None, dst: int | None = None, label: str = ""
    ) -> Pending:
        if _replicated(flat, shard, bounds):
            return DONE
        ranges = self._ranges(flat, bounds)
        flat, shard = real_view(flat), real_view(shard)
        return self._labelled(self._gather(flat, shard, ranges, dst), label)

    def _gather(self, flat: Tensor, shard: Tensor, ranges: list[tuple[int, int]], dst: int | None) -> _Works:
        even = _even(ranges)
        if dst is not None and even:
            chunks = list(flat.split(shard.numel())) if self.rank == dst else None
            return _Works([dist.gather(shard, chunks, dst=self._global_ranks[dst], group=self.group, async_op=True)])
        if even and self.pattern(flat.device).gather == "all_gather":
            return _Works([all_gather_single(flat, shard, group=self.group, async_op=True)])
        # One broadcast per owner: what gloo moves fastest, and what uneven ranges need (all-gather and
        # gather take equal ones). Gathering uneven ranges to ``dst`` alone broadcasts too (a rare path:
        # the other ranks receive into scratch, their ``flat`` may be empty).
        def target(lo: int, hi: int) -> Tensor:
            return flat[lo:hi] if flat.numel() >= hi else torch.empty(hi - lo, dtype=flat.dtype, device=flat.device)

        start, stop = ranges[self.rank]
        own = target(start, stop)
        if own.data_ptr() != shard.data_ptr():
            own.copy_(shard)
        return _Works([
            dist.broadcast(own if owner == self.rank else target(lo, hi), src=src, group=self.group, async_op=True)
            for owner, ((lo, hi), src) in enumerate(zip(ranges, self._global_ranks)) if hi > lo
        ])

    # -- small tensors --------------------------------------------------------------------------

    def launch_reduce(self, tensor: Tensor, how: Reduction, *, label: str = "") -> Pending:
        op = dist.ReduceOp.SUM if how == "sum" else dist.ReduceOp.MAX
        if tensor.is_sparse and backend_for(self.backend, tensor.device) != "gloo":
            return self._labelled(self._reduce_sparse_as_dense(tensor), label)
        return self._labelled(_Works([dist.all_reduce(tensor, op=op, group=self.group, async_op=True)]), label)

    def _reduce_sparse_as_dense(self, tensor: Tensor) -> Pending:
        """Sum a sparse tensor where only gloo sums sparse tensors: a dense sum, with a mask of the
        entries any rank holds, made sparse again (the union of the ranks' indices)."""
        coalesced = tensor.coalesce()
        mask = torch.zeros(coalesced.shape[: coalesced.sparse_dim()], dtype=torch.int32, device=tensor.device)
        mask[tuple(coalesced.indices())] = 1
        dense = coalesced.to_dense()
        works = [dist.all_reduce(t, group=self.group, async_op=True) for t in (mask, dense)]

        def finish() -> None:
            union = mask.nonzero().t()
            tensor.copy_(torch.sparse_coo_tensor(union, dense[tuple(union)], tensor.shape).coalesce())

        return _Works(works, finish)
