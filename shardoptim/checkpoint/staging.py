"""Host copies of a snapshot for a save in the background, made while training goes on.

``save(..., async_=True)`` returns once the tensors that training may change before the optimizer's
next ``step()`` are copied to host memory: the model's buffers (a forward updates running
statistics), an EMA, the RNG states, state kept outside the buckets. The optimizer's bucket state
and flat parameters, most of a checkpoint's bytes, are copied on the save's thread instead, while
the forward and backward run: a pre-hook on the optimizer's ``step()`` and ``load_state_dict()``
holds its next write until that copy is made. Nothing else in a training loop writes to those
tensors. A write from elsewhere before the next step (``p.mul_(2)`` under ``no_grad``) would tear the
copy, so the version counters of the copied tensors and of the optimizer's parameters are compared
before and after, and a change fails the save like any other error of a background save (raised at
the next ``save()`` or ``wait()``), never committed. (Writes through ``p.data`` bypass version
counters; call ``checkpoint.wait()`` before those.)

Copies go into host buffers kept from one save to the next (pinned for CUDA tensors): their pages
are faulted in, and pinned, once, at the cost of holding one snapshot's bytes of host memory.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .capture import Snapshot
from .errors import CheckpointError


class HostBuffers:
    """Host tensors kept for the next save, by name, reused where shape and dtype still match."""

    def __init__(self) -> None:
        self._kept: dict[str, Tensor] = {}

    def copies(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each tensor copied into its kept buffer (CUDA copies are queued, not waited for)."""
        return {name: self._buffer(name, tensor).copy_(tensor.detach(), non_blocking=tensor.is_cuda)
                for name, tensor in tensors.items()}

    def _buffer(self, name: str, tensor: Tensor) -> Tensor:
        kept = self._kept.get(name)
        if kept is None or kept.shape != tensor.shape or kept.dtype != tensor.dtype:
            kept = self._kept[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        return kept


#: One set for the process: at most one save is in flight, so a save's buffers are free by the next.
_buffers = HostBuffers()


class BackgroundCopy:
    """A snapshot on its way to host memory: the tensors ``eager`` copied when it is made, the rest by
    :meth:`finish` on the save's thread. :meth:`wait` blocks until :meth:`finish` is done;
    ``optimizer``'s ``step()`` and ``load_state_dict()`` call it first while it is pending."""

    def __init__(self, snapshot: Snapshot, deferred: set[str], optimizer: torch.optim.Optimizer | None) -> None:
        self._snapshot = snapshot
        eager = {name: t for name, t in snapshot.shard.items() if name not in deferred}
        self._deferred = {name: t for name, t in snapshot.shard.items() if name in deferred}
        watched = [*self._deferred.values()]
        if self._deferred and optimizer is not None:
            watched += [p for group in optimizer.param_groups for p in group["params"]]
        self._watched = [(t, t._version) for t in watched]
        self._copied = threading.Event()
        self._hooks: list[Any] = []
        self._cuda_ready = _record_cuda_event(self._deferred.values())
        self._eager = _buffers.copies(eager)
        self._shared = _buffers.copies(snapshot.shared)
        _synchronize_cuda([*eager.values(), *snapshot.shared.values()])
        if self._deferred and optimizer is not None:
            self._hooks = [optimizer.register_step_pre_hook(self._hold),
                           optimizer.register_load_state_dict_pre_hook(self._hold)]
        if not self._deferred:
            self._copied.set()

    def finish(self) -> Snapshot:
        """The snapshot in host memory (on the save's thread); ``CheckpointError`` if something wrote to
        the deferred tensors while they were copied."""
        try:
            deferred = _copy_on_side_stream(self._deferred, self._cuda_ready)
            changed = sum(tensor._version != version for tensor, version in self._watched)
            if changed:
                raise CheckpointError(
                    f"{changed} of the optimizer's tensors were written to in place while the background save "
                    f"copied them (before the next step()): call shardoptim.checkpoint.wait() before writing to "
                    f"the parameters or optimizer state outside step(); this save is not committed"
                )
            return replace(self._snapshot, shard={**self._eager, **deferred}, shared=self._shared)
        finally:
            self._deferred, self._watched = {}, []
            self._copied.set()

    def wait(self) -> None:
        self._copied.wait()

    def release(self) -> None:
        """Remove the optimizer's hooks (on the training thread: torch runs them from its own dicts)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _hold(self, *args: Any) -> None:
        self._copied.wait()


def _record_cuda_event(tensors: Any) -> Any:
    """An event after the work queued so far on the current CUDA stream, when any tensor is on CUDA."""
    if not any(t.is_cuda for t in tensors):
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _copy_on_side_stream(tensors: dict[str, Tensor], ready: Any) -> dict[str, Tensor]:
    if ready is None:
        return _buffers.copies(tensors)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        copies = _buffers.copies(tensors)
    stream.synchronize()
    return copies


def _synchronize_cuda(tensors: Sequence[Tensor]) -> None:
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()
