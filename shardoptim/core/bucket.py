"""``FlatBucket``: parameters, gradients and optimizer state of one layout as flat 1-D buffers."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from .layout import BucketLayout, Segment

#: Fresh gradients of at least this many elements are left where autograd put them in a bucket that
#: ``keeps_large_grads``: copying them into ``flat_grad`` is a full extra pass over them during backward
#: (0.8 ms of a 13.8 ms MLP training iteration), while a fused torch kernel takes lists and reads them
#: in place. Smaller ones are still copied: a list entry more costs more than copying them.
LARGE_GRAD_NUMEL = 1 << 15


def _scalar_dtype() -> torch.dtype:
    # torch stores ``step`` in float64 when that is the default dtype, else in float32.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class FlatBucket:
    """One bucket's storage, materialised from its ``BucketLayout``.

    On construction every parameter's ``.data`` is re-pointed to a view of ``flat_param`` (the
    ``nn.Parameter`` objects themselves stay the same) and a post-accumulate-grad hook moves a freshly
    allocated gradient into its view of ``flat_grad`` as soon as autograd produces it, so ``step()``
    finds the whole bucket's gradient in one tensor. A gradient that is already that view (accumulated
    in place, or kept by ``zero_grad(set_to_none=False)``) costs nothing. When ``keeps_large_grads``
    (set by the optimizer), a large gradient stays the parameter's own tensor (see ``LARGE_GRAD_NUMEL``)
    until ``step()`` either passes it to the fused kernel as it is or adopts it.

    Optimizer state covers only this rank's shard: ``state[name]`` is a 1-D tensor of
    ``layout.shard_numel`` elements; a complex state starts at ``complex(v, v)`` for an initial value
    ``v``, as torch fills it. ``steps`` counts each parameter's updates; ``scalar_state[name]`` holds one
    value per parameter (see ``UpdateRule.scalar_state``).
    """

    def __init__(self, layout: BucketLayout, params: Sequence[Tensor], rank: int = 0) -> None:
        self.layout = layout
        self.params = list(params)
        kwargs = {"dtype": layout.dtype, "device": layout.device}
        self.flat_param = torch.zeros(layout.numel, **kwargs)
        self.flat_grad = torch.zeros(layout.numel, **kwargs)
        lo, hi = layout.shard_range(rank)
        self.shard_param = self.flat_param[lo:hi]
        self.shard_grad = self.flat_grad[lo:hi]
        self.segments: tuple[Segment, ...] = layout.segments(rank)
        self._segment_by_slot = {segment.slot: segment for segment in self.segments}
        self.state: dict[str, Tensor] = {}
        self.steps = [0] * len(layout.slots)
        self.step_tensor = torch.zeros(len(layout.slots), dtype=_scalar_dtype(), device=layout.device)
        self.scalar_state: dict[str, Tensor] = {}
        self.grad_views: list[Tensor] = []
        self.keeps_large_grads = False

        with torch.no_grad():
            for slot, param in zip(layout.slots, self.params):
                view = self.flat_param[slot.offset : slot.end]
                view.copy_(param.detach().reshape(-1))
                param.data = view.view(slot.shape)
                grad_view = self.flat_grad[slot.offset : slot.end].view(slot.shape)
                self.grad_views.append(grad_view)
                if param.grad is not None:
                    grad_view.copy_(param.grad)
                    param.grad = grad_view

        handles = [
            param.register_post_accumulate_grad_hook(_grad_adopter(weakref.ref(self), position))
            for position, param in enumerate(self.params)
        ]
        weakref.finalize(self, _remove_hooks, handles)

    def adopt_grad(self, position: int, *, keep_large: bool = False) -> bool:
        """Make the parameter's ``.grad`` its view of ``flat_grad``; return whether it has a gradient.

        With ``keep_large``, a gradient this bucket keeps where it is (see ``LARGE_GRAD_NUMEL``) stays.
        """
        param, view = self.params[position], self.grad_views[position]
        grad = param.grad
        if grad is None:
            return False
        keep = (
            keep_large and self.keeps_large_grads and grad.numel() >= LARGE_GRAD_NUMEL
            and not grad.is_sparse and grad.is_contiguous()
        )
        if grad is not view and not keep:
            view.copy_(grad)
            param.grad = view
        return True

    def collect_grads(self, *, keep_large: bool = False) -> list[int]:
        """Positions of the parameters that have a gradient, each now held in ``flat_grad`` (see ``adopt_grad``)."""
        return [position for position in range(len(self.params)) if self.adopt_grad(position, keep_large=keep_large)]

    def grads_elsewhere(self, positions: Sequence[int]) -> list[int]:
        """Those of ``positions`` whose gradient is not held in ``flat_grad``."""
        return [position for position in positions if self._grad_elsewhere(position) is not None]

    def _grad_elsewhere(self, position: int) -> Tensor | None:
        grad = self.params[position].grad
        return None if grad is None or grad is self.grad_views[position] else grad

    def runs(self, positions: Sequence[int]) -> list[tuple[int, int, Tensor | None]]:
        """``(start, stop, grad)`` pieces of an unsharded bucket that cover the slots of ``positions``.

        Each maximal run of adjacent slots whose gradients are in ``flat_grad`` is one piece (``grad``
        None: it is that slice of ``flat_grad``); each gradient held elsewhere is a piece of its own,
        with that gradient as a 1-D tensor.
        """
        pieces: list[tuple[int, int, Tensor | None]] = []
        previous = None
        for position in positions:
            slot, grad = self.layout.slots[position], self._grad_elsewhere(position)
            if grad is not None:
                pieces.append((slot.offset, slot.end, grad.view(-1)))
            elif pieces and pieces[-1][2] is None and previous == position - 1:
                pieces[-1] = (pieces[-1][0], slot.end, None)
            else:
                pieces.append((slot.offset, slot.end, None))
            previous = position
        return pieces

    def zero_missing_grads(self, positions: list[int]) -> None:
        """Zero the ``flat_grad`` view of every parameter not in ``positions`` (those without a gradient).

        Such views may still hold an old gradient; a collective over the whole flat buffer must see zeros.
        """
        present = set(positions)
        for position, view in enumerate(self.grad_views):
            if position not in present:
                view.zero_()

    def ensure_state(self, initial: dict[str, float]) -> None:
        """Allocate the named state tensors that do not exist yet, each filled with its initial value."""
        for name, value in initial.items():
            if name not in self.state:
                self.state[name] = torch.full(
                    (self.layout.shard_numel,), self._fill(value), dtype=self.layout.dtype,
                    device=self.layout.device,
                )

    def reset_slot(self, position: int, initial: dict[str, float]) -> None:
        """Forget a parameter's state: its step count and its part of every state tensor."""
        self.steps[position] = 0
        self.step_tensor[position] = 0
        segment = self.segment_of(position)
        if segment is not None:
            for name, value in initial.items():
                self.state[name][segment.start : segment.stop].fill_(self._fill(value))

    def set_scalar_state(self, positions: Sequence[int], values: dict[str, float]) -> None:
        """Set per-parameter scalars of ``positions``; each name is allocated like ``step_tensor`` on first use."""
        for name, value in values.items():
            tensor = self.scalar_state.get(name)
            if tensor is None:
                tensor = self.scalar_state[name] = torch.zeros_like(self.step_tensor)
            if len(positions) == len(self.steps):
                tensor.fill_(value)
            else:
                tensor[list(positions)] = value

    def _fill(self, value: float) -> float | complex:
        return complex(value, value) if self.layout.dtype.is_complex else value

    def segment_of(self, position: int) -> Segment | None:
        """The part of parameter ``position`` this rank owns, or None."""
        return self._segment_by_slot.get(position)

    def state_view(self, name: str, position: int) -> Tensor | None:
        """The owned part of one parameter's state tensor: shaped like the parameter when whole."""
        segment = self.segment_of(position)
        if segment is None:
            return None
        view = self.state[name][segment.start : segment.stop]
        shape = self.layout.slots[position].shape
        return view.view(shape) if segment.numel == self.layout.slots[position].numel else view


def _grad_adopter(bucket_ref: weakref.ref[FlatBucket], position: int):
    def adopt(param: Tensor) -> None:
        bucket = bucket_ref()
        # A sparse gradient is left as autograd made it (a dense buffer cannot take it in place): whether
        # to densify it or reject it is the algorithm's call at step() (torch's LBFGS densifies it).
        if bucket is not None and not param.grad.is_sparse:
            bucket.adopt_grad(position, keep_large=True)

    return adopt


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
