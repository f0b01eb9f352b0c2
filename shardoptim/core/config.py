"""``ShardingConfig``: what a sharded step does, as data given to the optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Average = Literal["auto", "reduce_scatter", "all_to_all", "all_reduce"]
Gather = Literal["auto", "all_gather", "broadcast"]

_AVERAGES = ("auto", "reduce_scatter", "all_to_all", "all_reduce")
_GATHERS = ("auto", "all_gather", "broadcast")


@dataclass(frozen=True, kw_only=True)
class ShardingConfig:
    """How a sharded optimizer cuts its buckets and moves them between ranks.

    Passed as ``sharding=`` to every optimizer; the default is ``ShardingConfig()``. Without a
    process group none of it applies: the optimizer is the single-process drop-in, one bucket per
    (param group, dtype, device). The collectives behind ``"auto"`` are chosen per backend and device
    from measurements (``docs/distributed.md``).
    """

    bucket_cap_numel: int | None = 1 << 22
    """Largest bucket, in elements (default 4M). Several buckets let one bucket's exchange overlap
    another's update and bound the transient buffers of an exchange; ``None`` makes one bucket per
    (param group, dtype, device)."""

    average: Average = "auto"
    """How gradients are averaged into each rank's shard: ``"reduce_scatter"`` (straight into the
    shard), ``"all_to_all"`` (each rank receives the others' copies of its shard and adds them: the
    bytes of a reduce-scatter, faster than gloo's reduce-scatter), ``"all_reduce"`` (the whole
    gradient averaged on every rank, twice the bytes, and ``.grad`` holds the average everywhere).
    ``"auto"``: reduce-scatter on NCCL, all-to-all on gloo."""

    gather: Gather = "auto"
    """How updated shards reach every rank: ``"all_gather"`` or ``"broadcast"`` (one broadcast per
    owner, launched together: faster on gloo). ``"auto"``: all-gather on NCCL, broadcasts on gloo."""

    shard_grads: bool = False
    """ZeRO-2: once a bucket's gradients are averaged into this rank's shard, its full gradient buffer
    is released and the parameters' ``.grad`` become None (read gradients before ``step()``, or keep
    the default). Gradient memory is then the shard plus the buckets being filled or exchanged; the
    saving reaches into backward only with ``overlap_grad_reduce``."""

    overlap_grad_reduce: bool = False
    """Launch each bucket's gradient average from the backward hooks as soon as all its gradients are
    in, instead of in ``step()``. Buckets are launched in one fixed order on every rank; a bucket
    whose gradients are incomplete (a parameter without a gradient this iteration) and every bucket
    after it are launched by ``step()``, so nothing hangs. Accumulate micro-batches inside
    ``optimizer.no_sync()``: a gradient arriving for a bucket already launched raises."""

    exchanges_in_flight: int = 2
    """Gradient averages in flight at once; launching one more first finishes the oldest."""

    collective_timeout_s: float | None = None
    """How long one of the step's collectives may take before it fails with an error naming it, its
    bucket and the step (a peer that died or hangs). ``None``: the process group's own timeout."""

    def __post_init__(self) -> None:
        if self.bucket_cap_numel is not None and (
            isinstance(self.bucket_cap_numel, bool) or not isinstance(self.bucket_cap_numel, int)
            or self.bucket_cap_numel < 1
        ):
            raise ValueError(f"bucket_cap_numel must be a positive int or None, got {self.bucket_cap_numel!r}")
        if self.average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {self.average!r}")
        if self.gather not in _GATHERS:
            raise ValueError(f"gather must be one of {_GATHERS}, got {self.gather!r}")
        for name in ("shard_grads", "overlap_grad_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        timeout = self.collective_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < math.inf):
            raise ValueError(f"collective_timeout_s must be a positive, finite number of seconds or None (the "
                             f"process group's own timeout), got {timeout!r}")
        if isinstance(self.exchanges_in_flight, bool) or not isinstance(self.exchanges_in_flight, int) or (
            self.exchanges_in_flight < 1
        ):
            raise ValueError(f"exchanges_in_flight must be a positive int, got {self.exchanges_in_flight!r}")
