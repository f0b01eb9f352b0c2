"""Communication over a torch.distributed process group: the sharded step and the replicated one.

``ShardedComm`` runs ZeRO-1 style: each rank owns one contiguous ``1/N`` slice of every flat bucket,
keeps optimizer state for it alone, gets the average of that slice's gradient, updates it and shares
the result. ``ReplicatedComm`` is for
the algorithms that cannot be cut (LBFGS, SparseAdam): gradients are averaged everywhere and every
rank runs the same update. All collectives are torch.distributed's; which ones is chosen per backend
and device in :func:`pattern_for`, from measurements, not from the textbook.
"""

from __future__ import annotations

import logging
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import Comm, LocalComm, NormReduction

if TYPE_CHECKING:
    from .bucket import FlatBucket

logger = logging.getLogger(__name__)

#: Largest bucket of a sharded optimizer, in elements. Several buckets let the exchange of one overlap
#: the update of another and bound the transient receive buffers of the all-to-all pattern.
SHARDED_BUCKET_CAP_NUMEL = 1 << 22

#: Gradient exchanges launched ahead of the bucket being updated.
EXCHANGES_IN_FLIGHT = 2

# torch 2.13 renamed the single-tensor collectives (the old names warn); older releases have only those.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class CollectivePattern:
    """How a sharded step moves one bucket between ranks.

    ``average``: ``"reduce_scatter"`` is a single-tensor reduce-scatter straight into the own shard;
    ``"all_to_all"`` is ``all_to_all_single`` of the flat gradient (rank ``j`` receives every other
    rank's slice ``j``) whose received slices are then added to the own one: the bytes of a
    reduce-scatter on the wire, with a transient receive buffer of ``(N-1)/N`` of the bucket.
    ``gather``: ``"all_gather"`` is a single-tensor all-gather in place; ``"broadcast"`` is one
    ``broadcast`` per shard owner, launched together.
    ``average_op``: the backend averages inside the collective (``ReduceOp.AVG``).
    """

    average: Literal["reduce_scatter", "all_to_all"]
    gather: Literal["all_gather", "broadcast"]
    average_op: bool = False


#: NCCL: reduce-scatter + all-gather moves the bytes of one all-reduce, and NCCL averages in the op.
NCCL_PATTERN = CollectivePattern("reduce_scatter", "all_gather", average_op=True)

#: gloo, by measurement (``python -m bench.dist --collectives``: this project's 2-core CPUs, one thread
#: per rank, one 56 MB float32 buffer, medians of interleaved runs). Averaging, 2 ranks:
#: ``all_to_all_single`` + add 29 ms, ``all_reduce`` 60 ms (then keeping the own slice),
#: reduce-scatter 118 ms; gathering: one ``broadcast`` per owner 22 ms, all-gather 95 ms (list: 88).
#: 4 ranks (two per core): 155 / 137 / 277 ms and 64 / 200 ms: the all-to-all sends half the bytes of
#: the all-reduce, which wins as soon as the wire and not the CPU is the limit.
GLOO_PATTERN = CollectivePattern("all_to_all", "broadcast")

#: Any other backend: the textbook collectives, averaging by a division after a sum.
DEFAULT_PATTERN = CollectivePattern("reduce_scatter", "all_gather")


def backend_for(backend: str, device: torch.device) -> str:
    """The backend that moves tensors on ``device``; ``backend`` is what ``dist.get_backend`` returns,
    one name (``"gloo"``) or one per device type (``"cpu:gloo,cuda:nccl"``)."""
    if ":" not in backend:
        return backend
    by_device = dict(part.split(":", 1) for part in backend.split(","))
    return by_device.get(device.type, backend)


def pattern_for(backend: str, device: torch.device) -> CollectivePattern:
    """The collectives a sharded step uses for buckets on ``device`` under ``backend``."""
    name = backend_for(backend, device)
    if name == "gloo":
        return GLOO_PATTERN
    if name == "nccl":
        return NCCL_PATTERN
    return DEFAULT_PATTERN


def _real(tensor: Tensor) -> Tensor:
    """A complex flat tensor as a flat real one (twice as long), so shard boundaries stay aligned."""
    return torch.view_as_real(tensor).view(-1) if tensor.is_complex() else tensor


class _GroupComm:
    """What the sharded and the replicated step share: the group, agreement on gradients, checks."""

    def __init__(self, process_group: dist.ProcessGroup) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group was given but torch.distributed is not initialized")
        self.group = process_group
        self.group_rank = dist.get_rank(process_group)
        self.group_size = dist.get_world_size(process_group)
        if self.group_rank < 0:
            raise ValueError("this process is not a member of the process_group it was given")
        self.backend = str(dist.get_backend(process_group))
        # Small bookkeeping tensors go where the backend takes them: CUDA for NCCL, CPU otherwise.
        only_nccl = self.backend == "nccl"
        self.scalar_device = torch.device("cuda", torch.cuda.current_device()) if only_nccl else torch.device("cpu")

    def check_same_params(self, signature: str, counts: Sequence[int]) -> None:
        """Raise ``ValueError`` on every rank unless every rank passed the same parameters.

        One ``all_gather_into_tensor`` of a few integers: a CRC of ``signature`` and ``counts``.
        """
        row = torch.tensor([zlib.crc32(signature.encode()), *counts], dtype=torch.int64, device=self.scalar_device)
        rows = torch.empty(self.group_size * row.numel(), dtype=torch.int64, device=self.scalar_device)
        all_gather_single(rows, row, group=self.group)
        table = rows.view(self.group_size, -1).tolist()
        if all(other == table[0] for other in table):
            return
        described = "; ".join(
            f"rank {rank}: {groups} groups, {params} parameters, {numel} elements"
            for rank, (_, groups, params, numel) in enumerate(table)
        )
        differing = [rank for rank, other in enumerate(table) if other != table[0]]
        raise ValueError(
            f"ranks of the process group were given different parameters ({described}); ranks {differing} "
            f"differ from rank 0 in count, shape, dtype or order. Every rank must pass the same parameters "
            f"in the same order."
        )

    def agree_on_grads(self, buckets: Sequence[FlatBucket], ready: list[list[int]]) -> list[list[int]]:
        """Per bucket, the positions with a gradient on any rank; one ``all_reduce`` (MAX) of a mask.

        A slot without a gradient on this rank contributes zeros to the average, as DDP counts a
        parameter that a rank's forward did not use.
        """
        flags: list[int] = []
        for bucket, positions in zip(buckets, ready):
            if len(positions) < len(bucket.params):
                bucket.zero_missing_grads(positions)
            present = [0] * len(bucket.params)
            for position in positions:
                present[position] = 1
            flags.extend(present)
        if not flags:
            return ready
        mask = torch.tensor(flags, dtype=torch.int32, device=self.scalar_device)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.group)
        merged = mask.tolist()
        agreed, start = [], 0
        for bucket in buckets:
            agreed.append([position for position in range(len(bucket.params)) if merged[start + position]])
            start += len(bucket.params)
        return agreed

    def mean_over_ranks(self, value: float) -> float:
        total = torch.tensor(float(value), dtype=torch.float64, device=self.scalar_device)
        dist.all_reduce(total, group=self.group)
        return total.item() / self.group_size

    def average_sparse_grads(self, params: Sequence[Tensor]) -> None:
        """Sparse gradients averaged over ranks: gloo sums sparse tensors itself (the union of their
        indices); other backends sum dense copies, with a mask of the present entries alongside.

        A rank without a gradient for a parameter some other rank has one for contributes an empty
        one with one sparse dimension, as ``nn.Embedding(sparse=True)`` produces.
        """
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.scalar_device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=self.group)
        for param, anywhere in zip(params, present.tolist()):
            if not anywhere:
                continue
            grad = param.grad
            if grad is None:
                grad = torch.sparse_coo_tensor(
                    torch.empty(1, 0, dtype=torch.long, device=param.device),
                    torch.empty(0, *param.shape[1:], dtype=param.dtype, device=param.device),
                    param.shape,
                )
            if backend_for(self.backend, param.device) == "gloo":
                dist.all_reduce(grad, group=self.group)
                param.grad = grad.coalesce().div_(self.group_size)
            else:
                param.grad = self._sum_as_dense(grad.coalesce()).div_(self.group_size)

    def _sum_as_dense(self, grad: Tensor) -> Tensor:
        indices = grad.indices()
        rows = grad.shape[: grad.sparse_dim()]
        mask = torch.zeros(rows, dtype=torch.int32, device=grad.device)
        mask[tuple(indices)] = 1
        dense = grad.to_dense()
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(dense, group=self.group)
        union = mask.nonzero().t()
        return torch.sparse_coo_tensor(union, dense[tuple(union)], grad.shape).coalesce()


class _PendingAverage:
    """One bucket's gradient exchange in flight; ``finish()`` waits and leaves the average in the shard.

    ``others`` (all-to-all only) are the slices received from the other ranks, added to the own one
    before dividing by ``divide_by``.
    """

    __slots__ = ("_work", "_shard", "_others", "_divide_by")

    def __init__(self, work: dist.Work, shard: Tensor, others: Sequence[Tensor], divide_by: int) -> None:
        self._work, self._shard, self._others, self._divide_by = work, shard, others, divide_by

    def finish(self) -> None:
        self._work.wait()
        for row in self._others:
            self._shard.add_(row)
        if self._divide_by > 1:
            self._shard.div_(self._divide_by)


class ShardedComm(_GroupComm):
    """Each rank owns shard ``rank`` of every bucket; every method is collective over the group.

    After ``update_pipeline`` (or ``average_grads``) a bucket's ``shard_grad`` holds the average over
    ranks; the rest of its ``flat_grad`` is not averaged (what it holds depends on the pattern).
    """

    def __init__(self, process_group: dist.ProcessGroup) -> None:
        super().__init__(process_group)
        self.rank = self.group_rank
        self.world_size = self.group_size
        self.bucket_cap_numel: int | None = SHARDED_BUCKET_CAP_NUMEL
        self._global_ranks = [dist.get_global_rank(process_group, rank) for rank in range(self.group_size)]

    def pattern(self, device: torch.device) -> CollectivePattern:
        return pattern_for(self.backend, device)

    # -- gradients ------------------------------------------------------------------------------

    def _launch_average(self, bucket: FlatBucket) -> _PendingAverage:
        pattern = self.pattern(bucket.layout.device)
        flat, shard = _real(bucket.flat_grad), _real(bucket.shard_grad)
        if pattern.average == "all_to_all":
            return self._launch_all_to_all(flat, shard)
        op = dist.ReduceOp.AVG if pattern.average_op else dist.ReduceOp.SUM
        work = reduce_scatter_single(shard, flat, op=op, group=self.group, async_op=True)
        return _PendingAverage(work, shard, (), 1 if pattern.average_op else self.world_size)

    def _launch_all_to_all(self, flat: Tensor, shard: Tensor) -> _PendingAverage:
        """Send slice ``j`` of ``flat`` to rank ``j``, receive every other rank's slice ``rank``.

        The first and the last rank keep their own slice out of the exchange (the slices for the
        others are contiguous there; at 2 ranks that is every rank), which saves copying it to
        itself and adding it back; a rank in the middle receives its own slice too, and skips it.
        """
        size, world, rank = shard.numel(), self.world_size, self.rank
        sizes = [size] * world
        send = flat
        if rank in (0, world - 1):
            sizes[rank] = 0
            send = flat[size:] if rank == 0 else flat[: -size]
        received = torch.empty(sum(sizes), dtype=flat.dtype, device=flat.device)
        work = dist.all_to_all_single(received, send, output_split_sizes=sizes, input_split_sizes=sizes,
                                      group=self.group, async_op=True)
        rows = received.split([n for n in sizes if n])
        sources = [source for source in range(world) if sizes[source]]
        others = [row for source, row in zip(sources, rows) if source != rank]
        return _PendingAverage(work, shard, others, world)

    def average_grads(self, buckets: Sequence[FlatBucket]) -> None:
        for pending in [self._launch_average(bucket) for bucket in buckets]:
            pending.finish()

    # -- parameters and state -------------------------------------------------------------------

    def _launch_gather(self, full: Tensor, shard: Tensor, dst: int | None) -> list[dist.Work]:
        pattern = self.pattern(full.device)
        full, shard = _real(full), _real(shard)
        size = shard.numel()
        if dst is not None:
            chunks = list(full.split(size)) if self.rank == dst else None
            return [dist.gather(shard, chunks, dst=self._global_ranks[dst], group=self.group, async_op=True)]
        if pattern.gather == "all_gather":
            return [all_gather_single(full, shard, group=self.group, async_op=True)]
        own = full[self.rank * size : (self.rank + 1) * size]
        if own.data_ptr() != shard.data_ptr():
            own.copy_(shard)
        return [
            dist.broadcast(full[owner * size : (owner + 1) * size], src=src, group=self.group, async_op=True)
            for owner, src in enumerate(self._global_ranks)
        ]

    def gather_params(self, buckets: Sequence[FlatBucket]) -> None:
        works = [w for bucket in buckets for w in self._launch_gather(bucket.flat_param, bucket.shard_param, None)]
        for work in works:
            work.wait()

    def gather_shards(self, fulls: Sequence[Tensor], shards: Sequence[Tensor], *, dst: int | None) -> None:
        works = [w for full, shard in zip(fulls, shards) for w in self._launch_gather(full, shard, dst)]
        for work in works:
            work.wait()

    # -- the step -------------------------------------------------------------------------------

    def update_pipeline(
        self, buckets: Sequence[FlatBucket], ready: list[list[int]], *, average_grads: bool
    ) -> Iterator[tuple[FlatBucket, list[int]]]:
        """Launch gradient exchanges ahead → per bucket: wait, yield for the update, launch the gather
        of its parameters → wait for all gathers. Every rank must consume the whole iterator."""
        work = [(bucket, positions) for bucket, positions in zip(buckets, ready) if positions]
        averaging: deque[_PendingAverage] = deque()
        launched = 0
        gathers: list[dist.Work] = []
        for index, (bucket, positions) in enumerate(work):
            if average_grads:
                while launched < min(len(work), index + EXCHANGES_IN_FLIGHT):
                    averaging.append(self._launch_average(work[launched][0]))
                    launched += 1
                averaging.popleft().finish()
            yield bucket, positions
            gathers.extend(self._launch_gather(bucket.flat_param, bucket.shard_param, None))
        for gather in gathers:
            gather.wait()

    def reduce_norm(self, value: Tensor, how: NormReduction) -> Tensor:
        combined = value.clone()
        op = dist.ReduceOp.SUM if how == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(combined, op=op, group=self.group)
        return combined


class ReplicatedComm(_GroupComm):
    """Every rank holds everything: gradients are averaged with ``all_reduce``, nothing is gathered.

    To the bucket layout it is a world of one (``rank=0``, ``world_size=1``).
    """

    rank = 0
    world_size = 1
    bucket_cap_numel = None

    def average_grads(self, buckets: Sequence[FlatBucket]) -> None:
        works = [dist.all_reduce(_real(bucket.flat_grad), group=self.group, async_op=True) for bucket in buckets]
        for bucket, work in zip(buckets, works):
            work.wait()
            bucket.flat_grad.div_(self.group_size)

    def gather_params(self, buckets: Sequence[FlatBucket]) -> None:
        return None

    def update_pipeline(
        self, buckets: Sequence[FlatBucket], ready: list[list[int]], *, average_grads: bool
    ) -> Iterator[tuple[FlatBucket, list[int]]]:
        work = [(bucket, positions) for bucket, positions in zip(buckets, ready) if positions]
        if average_grads:
            self.average_grads([bucket for bucket, _ in work])
        return iter(work)

    def reduce_norm(self, value: Tensor, how: NormReduction) -> Tensor:
        return value

    def gather_shards(self, fulls: Sequence[Tensor], shards: Sequence[Tensor], *, dst: int | None) -> None:
        LocalComm().gather_shards(fulls, shards, dst=dst)


def distributed_comm(process_group: dist.ProcessGroup, *, sharded: bool) -> Comm:
    """The ``Comm`` for an optimizer given ``process_group``; a group of one is the local world."""
    comm: Comm
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) == 1:
        comm = LocalComm()
    else:
        comm = ShardedComm(process_group) if sharded else ReplicatedComm(process_group)
    logger.debug("optimizer communication: %s", type(comm).__name__)
    return comm
