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

from .comm import DONE, Pending, Reduction
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


def _real(tensor: Tensor) -> Tensor:
    """A complex flat tensor as a flat real one (twice as long), so shard boundaries stay aligned."""
    return torch.view_as_real(tensor).view(-1) if tensor.is_complex() else tensor


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

    def launch_average(self, flat: Tensor, shard: Tensor, *, label: str = "") -> Pending:
        flat, shard = _real(flat), _real(shard)
        if shard.numel() == flat.numel() or self.pattern(flat.device).average == "all_reduce":
            works = self._all_reduce_average(flat, shard)
        elif self.pattern(flat.device).average == "all_to_all":
            works = self._all_to_all_average(flat, shard)
        else:
            works = self._reduce_scatter_average(flat, shard)
        return self._labelled(works, label)

    def _own_slice(self, flat: Tensor) -> Tensor:
        size = flat.numel() // self.world_size
        return flat[self.rank * size : (self.rank + 1) * size]

    def _all_reduce_average(self, flat: Tensor, shard: Tensor) -> Pending:
        op = dist.ReduceOp.AVG if self.pattern(flat.device).average_op else dist.ReduceOp.SUM
        work = dist.all_reduce(flat, op=op, group=self.group, async_op=True)

        def finish() -> None:
            if op != dist.ReduceOp.AVG:
                flat.div_(self.world_size)
            if shard.numel() != flat.numel():
                own = self._own_slice(flat)
                if own.data_ptr() != shard.data_ptr():
                    shard.copy_(own)

        return _Works([work], finish)

    def _reduce_scatter_average(self, flat: Tensor, shard: Tensor) -> Pending:
        average_op = self.pattern(flat.device).average_op
        op = dist.ReduceOp.AVG if average_op else dist.ReduceOp.SUM
        work = reduce_scatter_single(shard, flat, op=op, group=self.group, async_op=True)
        return _Works([work], None if average_op else lambda: shard.div_(self.world_size))

    def _all_to_all_average(self, flat: Tensor, shard: Tensor) -> Pending:
        """Send slice ``j`` of ``flat`` to rank ``j``, receive every other rank's slice ``rank``, add them.

        The first and the last rank keep their own slice out of the exchange (the slices for the
        others are contiguous there; at 2 ranks that is every rank), which saves sending it to
        itself; a rank in the middle receives its own slice too, and skips it.
        """
        size, world, rank = shard.numel(), self.world_size, self.rank
        sizes = [size] * world
        send = flat
        if rank in (0, world - 1):
            sizes[rank] = 0
            send = flat[size:] if rank == 0 else flat[:-size]
        received = torch.empty(sum(sizes), dtype=flat.dtype, device=flat.device)
        own = self._own_slice(flat)
        work = dist.all_to_all_single(
            received, send, output_split_sizes=sizes, input_split_sizes=sizes, group=self.group, async_op=True
        )
        rows = dict(zip([source for source in range(world) if sizes[source]], received.split([n for n in sizes if n])))

        def finish() -> None:
            others = [row for source, row in rows.items() if source != rank]
            if others:  # the first sum written straight into the shard: no separate copy of ``own``
                torch.add(own, others[0], out=shard)
            elif own.data_ptr() != shard.data_ptr():
                shard.copy_(own)
            for row in others[1:]:
                shard.add_(row)
            shard.div_(world)

        return _Works([work], finish)

    # -- gathering ------------------------------------------------------------------------------

    def launch_gather(self, flat: Tensor, shard: Tensor, *, dst: int | None = None, label: str = "") -> Pending:
        flat, shard = _real(flat), _real(shard)
        if shard.numel() == flat.numel():
            return DONE
        return self._labelled(self._gather(flat, shard, dst), label)

    def _gather(self, flat: Tensor, shard: Tensor, dst: int | None) -> _Works:
        size = shard.numel()
        if dst is not None:
            chunks = list(flat.split(size)) if self.rank == dst else None
            return _Works([dist.gather(shard, chunks, dst=self._global_ranks[dst], group=self.group, async_op=True)])
        if self.pattern(flat.device).gather == "all_gather":
            return _Works([all_gather_single(flat, shard, group=self.group, async_op=True)])
        own = self._own_slice(flat)
        if own.data_ptr() != shard.data_ptr():
            own.copy_(shard)
        return _Works([
            dist.broadcast(flat[owner * size : (owner + 1) * size], src=src, group=self.group, async_op=True)
            for owner, src in enumerate(self._global_ranks)
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
