"""``MemoryReport``: the bytes each rank holds for an optimizer, from its layouts and its own tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .bucket import FlatBucket
from .tensor_rule import TensorRule


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds: ``params`` (the flat parameter buffers, whole on every rank), ``grads``
    (flat gradient buffers allocated now, plus ZeRO-2's shard buffers), ``state`` (the optimizer state
    of its shards, in its own dtype, a ``state_dtype`` master copy of the parameters, step counts and
    scalars included) and ``padding`` (the part of ``state`` and ``grads`` that holds no parameter)."""

    rank: int
    params: int
    grads: int
    state: int
    padding: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.state


@dataclass(frozen=True)
class MemoryReport:
    """Per rank, the bytes of an optimizer; ``largest_state_share`` is the largest rank's optimizer
    state against an even share of all ranks' (1.0: perfectly balanced). A matrix algorithm's
    whole-tensor partitions also report each rank's update ``costs`` (``TensorRule.cost`` of the
    parameters it owns) and ``largest_cost_share``."""

    ranks: tuple[RankMemory, ...]
    costs: tuple[float, ...] | None = None

    @property
    def largest_cost_share(self) -> float | None:
        if self.costs is None:
            return None
        total = sum(self.costs)
        return 1.0 if total == 0 else max(self.costs) / (total / len(self.costs))

    @property
    def largest_state_share(self) -> float:
        total = sum(rank.state for rank in self.ranks)
        if total == 0:
            return 1.0
        return max(rank.state for rank in self.ranks) / (total / len(self.ranks))

    def __str__(self) -> str:
        rows = [f"{'rank':>4} {'params':>12} {'grads':>12} {'state':>12} {'padding':>10}"]
        rows += [f"{r.rank:>4} {r.params:>12,} {r.grads:>12,} {r.state:>12,} {r.padding:>10,}" for r in self.ranks]
        rows.append(f"largest rank's optimizer state: {self.largest_state_share:.3f}x the even share")
        if self.costs is not None:
            rows.append(f"largest rank's update cost: {self.largest_cost_share:.3f}x the even share")
        return "\n".join(rows)


def memory_report(
    buckets: Sequence[FlatBucket], world_size: int, tensor_rules: Sequence[TensorRule | None] | None = None
) -> MemoryReport:
    """Each rank's bytes, computed from the layouts; this rank's gradient buffers as they are now.

    Every rank keeps the same state names for a bucket and the same number of gradient buffers
    allocated (they follow the same steps), so one rank can tell every rank's share. A bucket with a
    ``TensorRule`` (``tensor_rules``, per bucket) keeps its state per parameter, owned whole: each
    rank's is what ``state_shapes`` says of the parameters in its ranges (as allocated once they
    have stepped).
    """
    rules = list(tensor_rules) if tensor_rules is not None else [None] * len(buckets)
    ranks = []
    costs = [0.0] * world_size if any(rule is not None for rule in rules) else None
    for rank in range(world_size):
        params = grads = state = padding = 0
        for bucket, tensor_rule in zip(buckets, rules):
            layout = bucket.layout
            size = layout.dtype.itemsize
            shard = layout.shard_numel(rank)
            shard_padding = _padding_in_range(bucket, *layout.shard_range(rank))
            params += layout.numel * size
            flat_grad = layout.numel * size if bucket.flat_grad is not None else 0
            grads += flat_grad + (shard * size if bucket.shard_grads else 0)
            padding += (shard_padding * size if bucket.shard_grads else 0)
            if bucket.flat_grad is not None:
                padding += bucket.padding_numel() * size
            if tensor_rule is not None:
                for segment in layout.segments(rank):
                    shape = layout.slots[segment.slot].shape
                    state += tensor_rule.state_numel(shape) * size + 4 * len(tensor_rule.scalar_names)
                    costs[rank] += tensor_rule.cost(shape)
                continue
            names, state_size = len(bucket.state.tensors), bucket.state.dtype.itemsize
            state += names * shard * state_size + bucket.state.steps.nbytes
            state += sum(t.nbytes for t in bucket.state.scalars.values())
            padding += names * shard_padding * state_size
        ranks.append(RankMemory(rank, params, grads, state, padding))
    return MemoryReport(tuple(ranks), None if costs is None else tuple(costs))


def _padding_in_range(bucket: FlatBucket, start: int, stop: int) -> int:
    covered = sum(max(0, min(slot.end, stop) - max(slot.offset, start)) for slot in bucket.layout.slots)
    return (stop - start) - covered
