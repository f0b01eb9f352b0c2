"""``GradSync``: gradients from backward to the update, through the buckets and, sharded, across ranks.

Per step it answers two questions for every bucket: which parameters have a gradient (on any rank:
torch's rule that a parameter without one is not touched, applied across ranks as DDP counts a
rank's unused parameter as a zero gradient), and when this rank's shard of the gradient holds the
average over ranks.

The collectives of a step are issued in the same order on every rank, whatever the timing:

1. With ``overlap_grad_reduce``, the averages of the buckets that have parameters requiring grad
   ("active" buckets), in one fixed order (the order in which they complete in backward: the bucket
   holding the latest parameters first). A bucket is launched from the gradient hooks once all its
   parameters that require grad have their gradient and every bucket before it is launched; what
   backward did not launch, ``collect()`` does.
2. One all-reduce of the presence mask (a flag per parameter).
3. The averages of the buckets with gradients not launched yet, in the same order, at most
   ``exchanges_in_flight`` at a time, as ``averaged()`` hands each bucket to the update.

Parameters without a gradient on a rank contribute zeros. With ``overlap_grad_reduce`` the end of
each backward waits for the averages it launched, so ``.grad`` is settled when ``backward()``
returns, as under DDP. Inside ``no_sync()`` nothing is launched and gradients accumulate.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch

from .bucket import FlatBucket
from .comm import Comm, Pending
from .config import ShardingConfig


class GradSync:
    """Collects, agrees on and averages the gradients of an optimizer's buckets (see the module docstring).

    ``average`` is False when the gradients arrive averaged already (DDP, ``reduce_grads=False``).
    Only sharded buckets are averaged; a world of one has nothing to agree on.
    """

    def __init__(
        self, buckets: list[FlatBucket], comm: Comm, config: ShardingConfig, *, average: bool, sharded: bool
    ) -> None:
        self._buckets = buckets  # the optimizer's own list: buckets added later are seen
        self._comm = comm
        self._config = config
        self.average = average
        self.accumulating = False
        self._sharded = sharded
        self._indices: dict[int, int] = {}
        self._planned_order: list[int] | None = None  # the buckets' launch order, until they change
        #: Steps taken so far: what errors of the step's collectives say they were part of.
        self.steps_taken = 0
        self._reset()

    def buckets_changed(self) -> None:
        """The optimizer added or replaced buckets: forget what was planned for the old ones."""
        self.end_step()
        self._indices = {}
        self._planned_order = None

    @property
    def overlaps(self) -> bool:
        return self._sharded and self.average and self._config.overlap_grad_reduce

    def _reset(self) -> None:
        self._order: list[int] | None = None  # launch order of the buckets, fixed for one step
        self._active: list[int] = []  # the buckets step 1 launches, in order
        self._next_active = 0
        self._arrived: dict[int, set[int]] = {}
        self._expected: dict[int, int] = {}  # per bucket: its parameters that require grad now
        self._present: dict[int, list[int]] = {}  # this rank's gradients, per launched bucket
        self._in_flight: OrderedDict[int, Pending] = OrderedDict()
        self._finished: set[int] = set()
        self._ready: list[list[int]] | None = None
        self._backward_watched = False

    # -- during backward ------------------------------------------------------------------------

    def grad_ready(self, bucket: FlatBucket, position: int) -> None:
        """A parameter's gradient is complete (post-accumulate-grad hook): move it into the bucket,
        and with overlap launch what became complete."""
        bucket.take_grad(position, keep_large=True)
        if not self.overlaps or self.accumulating:
            return
        self._start_iteration()
        index = self._index(bucket)
        arrived = self._arrived.setdefault(index, set())
        arrived.add(position)
        while self._next_active < len(self._active) and self._complete(self._active[self._next_active]):
            self._launch(self._active[self._next_active])
            self._next_active += 1

    def grad_arriving(self, bucket: FlatBucket, position: int) -> None:
        """A gradient is about to be accumulated (tensor hook, overlap only): refuse it if its bucket
        is already being averaged, before it could be written into the buffer in use."""
        index = self._index(bucket)
        if not self.accumulating and (index in self._in_flight or index in self._finished):
            raise RuntimeError(
                "a gradient arrived for a bucket whose average was already launched in this step "
                "(overlap_grad_reduce=True): run every backward but the last of a step inside "
                "optimizer.no_sync(), or call step()/zero_grad() between backward passes"
            )

    def _start_iteration(self) -> None:
        self._fix_order()
        if not self._backward_watched:
            self._backward_watched = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._backward_watched = False
        for index in list(self._in_flight):
            self._finish(index)

    def _complete(self, index: int) -> bool:
        expected = self._expected.get(index)
        if expected is None:
            expected = self._expected[index] = sum(p.requires_grad for p in self._buckets[index].params)
        return len(self._arrived.get(index, ())) >= expected

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self.accumulating = self.accumulating, True
        try:
            yield
        finally:
            self.accumulating = previous

    # -- in step() ------------------------------------------------------------------------------

    def collect(self) -> list[list[int]]:
        """Per bucket, the positions that have a gradient on some rank (collective when sharded).

        Every gradient is in its bucket afterwards (a large fresh one may stay where autograd put it
        in an unsharded bucket that keeps them). Sharded, a second call in the same step returns what
        the first agreed on (``clip_grad_norm_`` then ``step()``); unsharded, it looks again.
        """
        if not self._sharded:
            self._present, self._finished, self._ready = {}, set(), None
        if self._ready is not None:
            return self._ready
        self._fix_order()
        if self.overlaps:
            for index in self._active[self._next_active :]:
                self._launch(index)
            self._next_active = len(self._active)
        for index, bucket in enumerate(self._buckets):
            if index not in self._present:
                self._present[index] = self._take_grads(bucket)
        local = [self._present[index] for index in range(len(self._buckets))]
        self._ready = self._agree(local) if self._sharded else local
        return self._ready

    def averaged(self, ready: Sequence[list[int]]) -> Iterator[int]:
        """The indices of the buckets with gradients, in launch order, each once its shard holds the
        average (collective when sharded: consume it whole on every rank)."""
        work = [index for index in self._order if ready[index]]
        for i, index in enumerate(work):
            if self._sharded and self.average:
                for ahead in work[i : i + self._config.exchanges_in_flight]:
                    self._launch(ahead)
            self._finish(index)
            yield index

    def end_step(self) -> None:
        """Finish what is in flight and forget this step's gradients' bookkeeping."""
        for index in list(self._in_flight):
            self._finish(index)
        self._reset()

    def _fix_order(self) -> None:
        """Decide this step's launch order (the buckets' own, planned once per set of buckets) and, with
        overlap, which buckets are active (parameters may be frozen or unfrozen between steps)."""
        if self._order is None:
            if self._planned_order is None:
                self._planned_order = self._launch_order()
            self._order = self._planned_order
            if self.overlaps:
                self._active = [i for i in self._order if any(p.requires_grad for p in self._buckets[i].params)]

    def _launch_order(self) -> list[int]:
        # Backward delivers the latest parameters first: a bucket completes when its earliest one does.
        indices = range(len(self._buckets))
        if not self._sharded:
            return list(indices)
        return sorted(indices, key=lambda i: -min((s.index for s in self._buckets[i].layout.slots), default=0))

    def _index(self, bucket: FlatBucket) -> int:
        if not self._indices:
            self._indices = {id(candidate): index for index, candidate in enumerate(self._buckets)}
        return self._indices[id(bucket)]

    def _take_grads(self, bucket: FlatBucket) -> list[int]:
        return bucket.take_grads(keep_large=not bucket.is_sharded)

    def _agree(self, local: list[list[int]]) -> list[list[int]]:
        """One all-reduce (max) of a flag per parameter: the positions with a gradient on any rank."""
        sizes = [len(bucket.params) for bucket in self._buckets]
        flags = torch.zeros(sum(sizes), dtype=torch.int32)
        start = 0
        for size, positions in zip(sizes, local):
            if len(positions) == size:  # the usual step: every parameter has its gradient
                flags[start : start + size] = 1
            else:
                flags[[start + p for p in positions]] = 1
            start += size
        mask = flags.to(self._comm.small_device)
        self._comm.launch_reduce(mask, "max", label=f"step {self.steps_taken + 1}: the gradient presence mask").wait()
        merged, agreed, start = mask.tolist(), [], 0
        for size in sizes:
            flagged = merged[start : start + size]
            agreed.append(list(range(size)) if all(flagged) else [p for p, flag in enumerate(flagged) if flag])
            start += size
        return agreed

    # -- averaging one bucket -------------------------------------------------------------------

    def _launch(self, index: int) -> None:
        """Start averaging bucket ``index`` (nothing if it was launched this step)."""
        if index in self._in_flight or index in self._finished or not (self._sharded and self.average):
            return
        while len(self._in_flight) >= self._config.exchanges_in_flight:
            self._finish(next(iter(self._in_flight)))
        bucket = self._buckets[index]
        present = self._present.get(index)
        if present is None:
            present = self._present[index] = self._take_grads(bucket)
        for position in bucket.sparse_positions:
            bucket.densify_grad(position)
        bucket.zero_grads_except(present)
        label = f"step {self.steps_taken + 1}: the gradient average of bucket {index} ({bucket.layout.numel} elements)"
        self._in_flight[index] = self._comm.launch_average(
            bucket.grad_buffer(), bucket.shard_grad, bounds=bucket.layout.bounds, label=label
        )

    def _finish(self, index: int) -> None:
        """Wait for bucket ``index``'s average (launching it if needed); ZeRO-2 then frees the full buffer."""
        if index in self._finished:
            return
        bucket = self._buckets[index]
        if self._sharded and self.average:
            self._launch(index)
            self._in_flight.pop(index).wait()
        else:
            present = self._present.get(index)
            if present is None:
                present = self._present[index] = self._take_grads(bucket)
            bucket.zero_grads_except(present)
            if bucket.shard_grads:
                bucket.shard_grad.copy_(bucket.grad_buffer()[bucket.start : bucket.stop])
        self._finished.add(index)
        if bucket.shard_grads:
            bucket.release_grads()
