"""Clipping gradients by their global norm, computed over flat buckets (and, sharded, over ranks).

Each rank reduces its own shard of every bucket to one number, the ranks combine those numbers with
one ``all_reduce`` of a scalar, and every rank scales its shard by the same factor. Unsharded, the
shard is the whole flat gradient and nothing is exchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .bucket import FlatBucket
from .comm import Comm

#: Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
_EPS = 1e-6


def _shard_norm(shard: Tensor, norm_type: float) -> Tensor:
    # Half-precision gradients are reduced in float32; float32 and float64 in their own precision.
    if shard.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(shard, norm_type, dtype=torch.float32)
    return torch.linalg.vector_norm(shard, norm_type)


def clip_grad_norm(
    buckets: Sequence[FlatBucket],
    ready: Sequence[list[int]],
    comm: Comm,
    *,
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
) -> Tensor:
    """Scale every bucket's ``shard_grad`` so the global ``norm_type``-norm is at most ``max_norm``.

    ``ready`` lists, per bucket, the positions that have a gradient on some rank (the same list on
    every rank); only those parameters count. Collective when ``comm`` spans several ranks. Returns the
    total norm (float32, or float64 when a bucket is float64) on the first bucket's device.
    """
    norm_type = float(norm_type)
    if not (norm_type > 0 or norm_type == math.inf):
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    active = [bucket for bucket, positions in zip(buckets, ready) if positions]
    if not active:
        return torch.tensor(0.0)
    for bucket, positions in zip(buckets, ready):
        if positions and len(positions) < len(bucket.params):
            bucket.zero_missing_grads(positions)

    device = active[0].layout.device
    wide = any(bucket.layout.dtype in (torch.float64, torch.complex128) for bucket in active)
    dtype = torch.float64 if wide else torch.float32
    norms = torch.stack([_shard_norm(bucket.shard_grad, norm_type).to(device, dtype) for bucket in active])
    if norm_type == math.inf:
        total = comm.reduce_norm(norms.max(), "max")
    else:
        total = comm.reduce_norm(norms.pow(norm_type).sum(), "sum").pow(1.0 / norm_type)

    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be clipped. "
            f"Pass error_if_nonfinite=False to scale the gradients by the non-finite norm anyway."
        )
    scale = (max_norm / (total + _EPS)).clamp(max=1.0)
    for bucket in active:
        bucket.shard_grad.mul_(scale.to(bucket.shard_grad.device))
    return total
