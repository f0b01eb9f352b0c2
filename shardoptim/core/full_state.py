"""Gathering a sharded optimizer's state into torch's per-parameter format.

A bucket's state tensor ``name`` is one flat shard per rank, so the full tensor is one collective
per (bucket, state name): every rank's shard lands in a bucket-sized flat tensor, and each
parameter's entry is a view of it shaped like the parameter. Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .bucket import FlatBucket
from .comm import Comm


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
            pending.append(comm.launch_gather(full, shard, dst=dst, label=f"state_dict: gathering {name} of bucket {index}"))
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
