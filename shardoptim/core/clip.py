"""Clipping gradients by their global norm, computed over flat shards (and, sharded, over ranks).

Each rank reduces its own shard of every sharded bucket to one number, the ranks combine those
numbers with one reduction of a scalar, and every rank scales its shard by the same factor.
Gradients every rank holds whole (unsharded buckets, parameters outside buckets) count once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .comm import Comm

#: Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
_EPS = 1e-6


def _norm(t: Tensor, norm_type: float) -> Tensor:
    if t.is_sparse:
        t = t.coalesce()._values()
    # Half-precision gradients are reduced in float32; float32 and float64 in their own precision.
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(t, norm_type, dtype=torch.float32)
    return torch.linalg.vector_norm(t, norm_type)


def _combine(norms: list[Tensor], norm_type: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The norm of norms (partial ``norm_type``-powers summed, or the maximum); 0 for none."""
    if not norms:
        return torch.zeros((), dtype=dtype, device=device)
    stacked = torch.stack([n.to(device, dtype) for n in norms])
    return stacked.max() if norm_type == math.inf else stacked.pow(norm_type).sum()


def clip_grad_norm(
    sharded: Sequence[Tensor],
    whole: Sequence[Tensor],
    comm: Comm,
    *,
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
) -> Tensor:
    """Scale ``sharded`` (this rank's shards) and ``whole`` (tensors every rank holds entirely) so that
    their global ``norm_type``-norm is at most ``max_norm``; return that norm.

    Collective when ``comm`` spans several ranks and ``sharded`` is not empty on them. Returns the
    total norm (float32, or float64 when a gradient is float64) on the first gradient's device.
    """
    norm_type = float(norm_type)
    if not (norm_type > 0 or norm_type == math.inf):
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    everything = [*sharded, *whole]
    if not everything:
        return torch.tensor(0.0)
    device = everything[0].device
    wide = any(t.dtype in (torch.float64, torch.complex128) for t in everything)
    dtype = torch.float64 if wide else torch.float32

    partial = _combine([_norm(t, norm_type) for t in sharded], norm_type, dtype, device)
    if comm.world_size > 1 and sharded:
        partial = partial.to(comm.small_device)
        how = "max" if norm_type == math.inf else "sum"
        comm.launch_reduce(partial, how, label="clip_grad_norm_: the reduction of the gradient norm").wait()
        partial = partial.to(device)
    local = _combine([_norm(t, norm_type) for t in whole], norm_type, dtype, device)
    if norm_type == math.inf:
        total = torch.maximum(partial, local)
    else:
        total = (partial + local).pow(1.0 / norm_type)

    if error_if_nonfinite and not torch.isfinite(total):
        # torch.nn.utils.clip_grad_norm_'s words, which callers match on.
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )
    scale = (max_norm / (total + _EPS)).clamp(max=1.0)
    for t in everything:
        t.mul_(scale.to(t.device))
    return total
