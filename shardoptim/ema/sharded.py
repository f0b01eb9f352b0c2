"""``ShardedEMA``: an exponential moving average of an optimizer's flat parameter shards."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .averaging import check_decay

#: Elements exchanged per copy when swapping: bounds the scratch buffer at 8 MiB of float32.
SWAP_CHUNK_NUMEL = 1 << 21


class Bucket(Protocol):
    """What ``ShardedEMA`` reads from each of the optimizer's buckets."""

    flat_param: Tensor  # 1-D, the whole (padded) bucket; the model's parameters are views into it
    shard_param: Tensor  # 1-D view of the part of ``flat_param`` this rank owns and updates
    is_sharded: bool  # whether other ranks own other parts of ``flat_param``


class ShardedEMA:
    """Exponential moving average of the weights an optimizer updates, held only for this rank's shards.

    A shardoptim optimizer keeps its parameters in flat buckets and, under a process group, each rank
    updates only its shard of every bucket. ``ShardedEMA`` keeps one averaged copy of each bucket's
    ``shard_param``, so it costs 1/world_size of a full EMA copy (plus the buckets' padding), and each
    ``update()`` is one ``lerp_`` per bucket over contiguous memory.

    The average follows ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))`` number for
    number: the first ``update()`` copies the weights, every later one does
    ``average <- average + (1 - decay_t) * (weights - average)`` (``lerp``), with ``decay_t = decay``,
    or with ``warmup=True`` ``decay_t = min(decay, (1 + t) / (10 + t))`` at update ``t`` (counting
    from 0), which lets the average forget its early weights faster.

    Typical use::

        ema = ShardedEMA(optimizer, decay=0.999)
        for batch in loader:
            loss_fn(model(batch)).backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
        with ema.averaged():  # the model now runs with the averaged weights
            evaluate(model)

    Collective contract under a process group: ``update()``, ``state_dict()`` and
    ``load_state_dict()`` are local to the rank; ``swap()`` and ``averaged()`` must be called on
    every rank, since they refresh the full flat buffers through ``optimizer.gather_params()``.

    Args:
        optimizer: an object with ``buckets``, each having a 1-D ``flat_param`` and its owned 1-D
            ``shard_param`` view (every shardoptim optimizer). Buckets added after construction
            (``add_param_group``) are not covered: build the EMA after the optimizer is complete.
        decay: weight of the old average, in [0, 1].
        warmup: use the ramped decay above instead of a constant one.
    """

    def __init__(self, optimizer: Any, decay: float = 0.999, *, warmup: bool = False) -> None:
        check_decay(decay)
        if not hasattr(optimizer, "buckets"):
            raise TypeError(
                f"ShardedEMA needs an optimizer with flat buckets (a shardoptim optimizer); "
                f"{type(optimizer).__name__} has no 'buckets'"
            )
        self.optimizer = optimizer
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self._swapped = False
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        with torch.no_grad():
            self._shards = [bucket.shard_param.detach().clone() for bucket in self._buckets()]

    @property
    def shards(self) -> tuple[Tensor, ...]:
        """The averaged shards, one 1-D tensor per bucket, aligned with each bucket's ``shard_param``."""
        return tuple(self._shards)

    @property
    def swapped(self) -> bool:
        """Whether the averaged values are currently in the optimizer's parameters."""
        return self._swapped

    def decay_at(self, num_updates: int) -> float:
        """The decay that the update made after ``num_updates`` earlier updates uses (from the second on)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the optimizer's current weights into the average; call it after ``optimizer.step()``."""
        if self._swapped:
            raise RuntimeError("ShardedEMA.update() called while the averaged weights are swapped in; swap back first")
        live = [bucket.shard_param for bucket in self._buckets()]
        if self.num_updates == 0:
            torch._foreach_copy_(self._shards, live)
        else:
            torch._foreach_lerp_(self._shards, live, 1.0 - self.decay_at(self.num_updates))
        self.num_updates += 1

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the averaged weights with the optimizer's live ones; calling it again swaps back.

        Exact in both directions (values are moved, not recomputed) and allocates no full-size buffer:
        each shard is exchanged through a scratch buffer of at most ``SWAP_CHUNK_NUMEL`` elements, kept
        for later swaps. Under a process group this is collective: after exchanging its own shards,
        every rank calls ``optimizer.gather_params()`` so that the whole flat buffers (the parameters
        the model sees) hold the swapped-in values.
        """
        buckets = self._buckets()
        sharded = any(bucket.is_sharded for bucket in buckets)
        gather = getattr(self.optimizer, "gather_params", None)
        if sharded and not callable(gather):
            raise RuntimeError(
                f"the optimizer's buckets are sharded, so swapping needs {type(self.optimizer).__name__}"
                f".gather_params() to refresh the full parameters on every rank, and it has none"
            )
        for average, bucket in zip(self._shards, buckets):
            self._exchange(average, bucket.shard_param)
        self._swapped = not self._swapped
        if sharded:
            gather()

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Run the block with the averaged weights in the optimizer's parameters, then restore them.

        Do not step the optimizer inside the block: it would update the averaged weights.
        """
        if self._swapped:
            raise RuntimeError("the averaged weights are already swapped in (nested averaged() or a swap() not undone)")
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def state_dict(self) -> dict[str, Any]:
        """``{"decay": float, "warmup": bool, "num_updates": int, "shards": [Tensor per bucket]}``.

        The scalars are JSON data; ``shards`` are the averaged tensors themselves (not copies), each
        covering the same range of its bucket's flat buffer as that bucket's ``shard_param``, so a
        checkpoint stores and reshards them like the optimizer's flat state.
        """
        if self._swapped:
            raise RuntimeError(
                "ShardedEMA.state_dict() called while the averaged weights are swapped in; swap back first"
            )
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shards": list(self._shards),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from ``state_dict()``. Everything is checked before anything changes.

        ``shards`` must hold one tensor per bucket with as many elements as that bucket's
        ``shard_param``; values are copied (cast to the shard's dtype and device). ``warmup`` is
        optional and keeps its current value when absent.
        """
        self.check_state_dict(state_dict)
        for average, saved in zip(self._shards, state_dict["shards"]):
            average.copy_(saved.reshape(-1))
        self.decay = float(state_dict["decay"])
        self.num_updates = int(state_dict["num_updates"])
        self.warmup = bool(state_dict.get("warmup", self.warmup))

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise what ``load_state_dict(state_dict)`` would raise; change nothing."""
        if self._swapped:
            raise RuntimeError("ShardedEMA.load_state_dict() called while the averaged weights are swapped in")
        for key in ("decay", "num_updates", "shards"):
            if key not in state_dict:
                raise KeyError(f"ShardedEMA state dict has no {key!r} entry")
        decay, num_updates, shards = state_dict["decay"], state_dict["num_updates"], state_dict["shards"]
        if not isinstance(decay, numbers.Real):
            raise TypeError(f"decay must be a float, got {type(decay).__name__}")
        check_decay(decay)
        if not isinstance(num_updates, numbers.Integral) or isinstance(num_updates, bool) or num_updates < 0:
            raise ValueError(f"num_updates must be an int >= 0, got {num_updates!r}")
        _check_shards(shards, self._shards)

    def __repr__(self) -> str:
        elements = sum(shard.numel() for shard in self._shards)
        return (
            f"ShardedEMA(decay={self.decay}, warmup={self.warmup}, num_updates={self.num_updates}, "
            f"{len(self._shards)} shards, {elements} elements)"
        )

    def _buckets(self) -> Sequence[Bucket]:
        buckets = self.optimizer.buckets
        if hasattr(self, "_shards") and len(buckets) != len(self._shards):
            raise RuntimeError(
                f"the optimizer now has {len(buckets)} buckets, the EMA was built for {len(self._shards)}: "
                f"build ShardedEMA after the last add_param_group()"
            )
        return buckets

    def _exchange(self, a: Tensor, b: Tensor) -> None:
        if a.numel() == 0:
            return
        scratch = self._scratch_for(a)
        chunk = scratch.numel()
        for start in range(0, a.numel(), chunk):
            a_part, b_part = a[start : start + chunk], b[start : start + chunk]
            held = scratch[: a_part.numel()]
            held.copy_(a_part)
            a_part.copy_(b_part)
            b_part.copy_(held)

    def _scratch_for(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        scratch = self._scratch.get(key)
        if scratch is None:
            largest = max(s.numel() for s in self._shards if (s.device, s.dtype) == key)
            numel = min(largest, SWAP_CHUNK_NUMEL)
            scratch = self._scratch[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return scratch


def _check_shards(shards: Any, current: Sequence[Tensor]) -> None:
    if not isinstance(shards, (list, tuple)):
        raise TypeError(f"shards must be a list of tensors, got {type(shards).__name__}")
    if len(shards) != len(current):
        raise ValueError(f"state dict has {len(shards)} shards, this optimizer {len(current)} buckets")
    for index, (saved, mine) in enumerate(zip(shards, current)):
        if not isinstance(saved, Tensor):
            raise TypeError(f"shard {index} must be a tensor, got {type(saved).__name__}")
        if saved.numel() != mine.numel():
            raise ValueError(
                f"shard {index} has {saved.numel()} elements, this rank's shard of bucket {index} {mine.numel()}"
            )
