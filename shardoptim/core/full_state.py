"""Gathering a sharded optimizer's state into torch's per-parameter format.

A bucket's state tensor ``name`` is one flat shard per rank, so the full tensor is one collective
per (bucket, state name): every rank's shard lands in a bucket-sized flat tensor, and each
parameter's entry is a view of it shaped like the parameter. Nothing is pickled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .bucket import FlatBucket
from .comm import Comm
from .layout import BucketLayout
from .shard_state import scalar_dtype
from .tensor_rule import TensorRule


def gather_full_state(
    buckets: Sequence[FlatBucket],
    state: Mapping[Tensor, dict[str, Any]],
    comm: Comm,
    *,
    dst: int | None,
) -> dict[Tensor, dict[str, Any]]:
    """Every bucketed parameter's full state, keyed by parameter as ``Optimizer.state`` is.

    Per-element state is gathered from every rank's shard; any other entry of ``state[param]``
    (``step``, scalars) is the same on every rank and is taken as it is. With ``dst=None`` the result
    is built on every rank; otherwise only on group rank ``dst`` and the others get an empty dict.
    Collective: call on every rank. Entries are views of one flat tensor per (bucket, name): save
    them whole, copy what you extract.
    """
    receives = dst is None or comm.rank == dst
    pending, fulls = [], []
    for index, bucket in enumerate(buckets):
        by_name = {}
        for name, shard in bucket.state.tensors.items():
            full = torch.empty(bucket.layout.numel if receives else 0, dtype=shard.dtype, device=shard.device)
            pending.append(comm.launch_gather(
                full, shard, bounds=bucket.layout.bounds, dst=dst, label=f"state_dict: gathering {name} of bucket {index}"
            ))
            by_name[name] = full
        fulls.append(by_name)
    for work in pending:
        work.wait()
    if not receives:
        return {}

    gathered: dict[Tensor, dict[str, Any]] = {}
    for bucket, by_name in zip(buckets, fulls):
        steps = bucket.state.steps.tolist()
        for position, (param, slot) in enumerate(zip(bucket.params, bucket.layout.slots)):
            local = state.get(param, {})
            if not local and steps[position] == 0:
                continue
            entry = {key: value for key, value in local.items() if key not in by_name}
            for name, full in by_name.items():
                entry[name] = full[slot.offset : slot.end].view(slot.shape)
            gathered[param] = entry
    return gathered


def gather_owned_state(
    buckets: Sequence[FlatBucket],
    state: Mapping[Tensor, dict[str, Any]],
    comm: Comm,
    rule: TensorRule,
    *,
    dst: int | None,
) -> dict[Tensor, dict[str, Any]]:
    """A matrix algorithm's per-parameter state, each entry from the rank that owns the parameter
    (whole-tensor partitions), keyed by parameter; on every rank, or only on ``dst`` (the others get
    an empty dict). Collective: two small reductions (which parameters have state, and their scalar
    entries), then one gather per bucket of the owners' state tensors, concatenated."""
    receives = dst is None or comm.rank == dst
    slots = [(bucket, position) for bucket in buckets for position in range(len(bucket.params))]
    present = torch.zeros(len(slots), dtype=torch.int64, device=comm.small_device)
    scalars = torch.zeros(len(slots), max(1, len(rule.scalar_names)), dtype=torch.float64, device=comm.small_device)
    for row, (bucket, position) in enumerate(slots):
        entry = state.get(bucket.params[position])
        if bucket.segment_of(position) is not None and entry:
            present[row] = 1
            for column, name in enumerate(rule.scalar_names):
                scalars[row, column] = float(entry[name])
    pending = [comm.launch_reduce(present, "sum", label="state_dict: which parameters have state"),
               comm.launch_reduce(scalars, "sum", label="state_dict: the scalar state")]
    for work in pending:
        work.wait()
    has_state, scalar_rows = present.tolist(), scalars.tolist()

    row, gathered, pending, unpack = 0, {}, [], []
    for index, bucket in enumerate(buckets):
        layout = bucket.layout
        shapes = [rule.state_shapes(slot.shape) if has_state[row + p] else {} for p, slot in enumerate(layout.slots)]
        offsets, total = [], 0
        for named in shapes:
            offsets.append(total)
            total += sum(math.prod(shape) for shape in named.values())
        bounds = _owner_ranges(layout, offsets, total)
        full = torch.empty(total if receives else 0, dtype=layout.dtype, device=layout.device)
        own = [state[bucket.params[p]][name].reshape(-1) for p, named in enumerate(shapes)
               if named and bucket.segment_of(p) is not None for name in named]
        own_flat = torch.cat(own) if own else torch.empty(0, dtype=layout.dtype, device=layout.device)
        pending.append(comm.launch_gather(full, own_flat, bounds=bounds, dst=dst,
                                          label=f"state_dict: gathering the state of bucket {index}"))
        unpack.append((bucket, row, shapes, offsets, full))
        row += len(layout.slots)
    for work in pending:
        work.wait()
    if not receives:
        return {}
    for bucket, first, shapes, offsets, full in unpack:
        for position, (named, offset) in enumerate(zip(shapes, offsets)):
            if not named:
                continue
            entry: dict[str, Any] = {
                name: torch.tensor(scalar_rows[first + position][column], dtype=scalar_dtype())
                for column, name in enumerate(rule.scalar_names)
            }
            for name, shape in named.items():
                numel = math.prod(shape)
                entry[name] = full[offset : offset + numel].view(shape)
                offset += numel
            gathered[bucket.params[position]] = entry
    return gathered


def _owner_ranges(layout: BucketLayout, offsets: list[int], total: int) -> tuple[tuple[int, int], ...]:
    """Per rank, the range of a concatenation of per-slot pieces (at ``offsets``) that its slots
    cover: contiguous, since a whole-tensor partition orders its slots by owner."""
    starts = []
    for start, _ in layout.bounds:
        first = next((p for p, slot in enumerate(layout.slots) if slot.offset >= start), len(layout.slots))
        starts.append(offsets[first] if first < len(offsets) else total)
    return tuple(zip(starts, starts[1:] + [total]))
