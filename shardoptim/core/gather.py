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
    names: Sequence[Sequence[str]],
    comm: Comm,
    *,
    dst: int | None,
) -> dict[Tensor, dict[str, Any]]:
    """Every parameter's full state, keyed by parameter as ``Optimizer.state`` is.

    ``names[i]`` are the per-element state tensors of ``buckets[i]`` to gather; any other entry of
    ``state[param]`` (``step``, scalars) is the same on every rank and is taken as it is. With
    ``dst=None`` the result is built on every rank; otherwise only on group rank ``dst`` and the
    others get an empty dict. Collective: call on every rank.

    Entries are views of one flat tensor per (bucket, name): save them whole, copy what you extract.
    """
    receives = dst is None or comm.rank == dst
    fulls: list[Tensor] = []
    shards: list[Tensor] = []
    for bucket, bucket_names in zip(buckets, names):
        for name in bucket_names:
            shard = bucket.state[name]
            size = bucket.layout.numel if receives else 0
            fulls.append(torch.empty(size, dtype=shard.dtype, device=shard.device))
            shards.append(shard)
    comm.gather_shards(fulls, shards, dst=dst)
    if not receives:
        return {}

    gathered: dict[Tensor, dict[str, Any]] = {}
    next_full = iter(fulls)
    for bucket, bucket_names in zip(buckets, names):
        by_name = {name: next(next_full) for name in bucket_names}
        for position, (param, slot) in enumerate(zip(bucket.params, bucket.layout.slots)):
            local = state.get(param, {})
            if not local and bucket.steps[position] == 0:
                continue
            entry = {key: value for key, value in local.items() if key not in by_name}
            for name, full in by_name.items():
                entry[name] = full[slot.offset : slot.end].view(slot.shape)
            if entry:
                gathered[param] = entry
    return gathered
