"""``FlatBucket``: the parameters and gradients of one layout as flat 1-D buffers, and its shard's state."""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .alias import alias, aliases_buffer
from .layout import BucketLayout, Segment
from .shard_state import ShardState

_grad_of = operator.attrgetter("grad")

#: Fresh gradients of at least this many elements are left where autograd put them in a bucket that
#: ``keeps_large_grads``: copying them into ``flat_grad`` is a full extra pass over them during backward
#: (0.8 ms of a 13.8 ms MLP training iteration), while a fused torch kernel takes lists and reads them
#: in place. Smaller ones are still copied: a list entry more costs more than copying them.
LARGE_GRAD_NUMEL = 1 << 15

#: ``(start, stop, grad)``: a piece of the shard; ``grad`` None means that slice of ``shard_grad``.
Piece = tuple[int, int, "Tensor | None"]


class FlatBucket:
    """One bucket's storage, materialised from its ``BucketLayout`` for this rank.

    Every parameter's ``.data`` is re-pointed to its range of ``flat_param`` as an alias with a
    storage of its own (:mod:`shardoptim.core.alias`); the ``nn.Parameter`` objects stay the same.
    Gradients live in ``flat_grad`` the same way: a parameter's ``.grad`` is its alias there, which
    autograd accumulates into in place; a freshly allocated gradient is moved there by the
    post-accumulate-grad hook (or by ``take_grad`` in ``step()``). Only parameters that require grad
    get hooks (``ensure_hooks`` adds them for parameters unfrozen later); a gradient assigned by hand
    is found by ``take_grad``.

    ``shard_param`` and ``shard_grad`` are this rank's range. Sharded with ``shard_grads`` (ZeRO-2),
    ``shard_grad`` is a buffer of its own and ``flat_grad`` exists only from a step's first gradient
    until ``release_grads()``; otherwise ``shard_grad`` is a view of ``flat_grad``, which persists.
    ``state`` is the optimizer state of the shard, in ``state_dtype`` when given (wider than the
    parameters: it then holds a master copy of ``shard_param``, :mod:`shardoptim.core.master`).
    """

    def __init__(
        self,
        layout: BucketLayout,
        params: Sequence[Tensor],
        *,
        rank: int = 0,
        shard_grads: bool = False,
        on_grad_ready: Callable[[FlatBucket, int], None] | None = None,
        on_grad_arriving: Callable[[FlatBucket, int], None] | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        self.layout = layout
        self.params = list(params)
        self.start, self.stop = layout.shard_range(rank)
        self._segment_by_slot = {segment.slot: segment for segment in layout.segments(rank)}
        self.keeps_large_grads = False
        #: Extra updates per step of a parameter listed more than once in its group (torch updates it
        #: once per listing), by position.
        self.repeats: dict[int, int] = {}
        #: Positions whose gradient ``take_grads`` last found sparse, or kept where autograd put it.
        self.sparse_positions: set[int] = set()
        self.kept_positions: set[int] = set()
        self.shard_grads = shard_grads and layout.is_sharded
        self.on_grad_ready = on_grad_ready
        self.on_grad_arriving = on_grad_arriving
        kwargs = {"dtype": layout.dtype, "device": layout.device}
        self.flat_param = torch.zeros(layout.numel, **kwargs)
        self.shard_param = self.flat_param[self.start : self.stop]
        self.state = ShardState(layout, rank, dtype=state_dtype, params=self.shard_param)
        self.flat_grad: Tensor | None = None
        self._grad_views: list[Tensor] = []
        self._gaps = _gaps(layout)
        self._param_ptrs = [0] * len(self.params)
        with torch.no_grad():
            for position, param in enumerate(self.params):
                self.adopt_param(position)
            if self.shard_grads:
                self.shard_grad = torch.zeros(self.stop - self.start, **kwargs)
            else:
                self._allocate_grads(zeroed=True)
                self.shard_grad = self.flat_grad[self.start : self.stop]
            for position in range(len(self.params)):
                self.take_grad(position)
        self._hooks: list[list] = [[] for _ in self.params]
        self.ensure_hooks()
        weakref.finalize(self, _remove_hooks, self._hooks)

    @property
    def is_sharded(self) -> bool:
        return self.layout.is_sharded

    # -- parameters -----------------------------------------------------------------------------

    def adopt_param(self, position: int) -> None:
        """Copy the parameter's current values into its range of ``flat_param`` and re-point it there."""
        slot, param = self.layout.slots[position], self.params[position]
        with torch.no_grad():
            self.flat_param[slot.offset : slot.end].copy_(param.detach().reshape(-1))
            param.data = alias(self.flat_param, slot.offset, slot.shape)
        self._param_ptrs[position] = param.data_ptr()

    def moved_params(self) -> list[int]:
        """Positions of the parameters that something re-pointed since (``p.data = ...``, ``.to(...)``)."""
        pointers = list(map(Tensor.data_ptr, self.params))  # per step: one C call per parameter
        if pointers == self._param_ptrs:
            return []
        return [position for position, (now, ptr) in enumerate(zip(pointers, self._param_ptrs)) if now != ptr]

    def holds_param(self, position: int) -> bool:
        """Whether the parameter still reads its range of ``flat_param`` (nothing re-pointed it since)."""
        slot, param = self.layout.slots[position], self.params[position]
        return tuple(param.shape) == slot.shape and aliases_buffer(param, self.flat_param, slot.offset)

    # -- gradients ------------------------------------------------------------------------------

    def _allocate_grads(self, *, zeroed: bool = False) -> None:
        # Padding must hold zeros (it is averaged and clipped with the rest); a slot is written before
        # it is read (a gradient copied in, or zeroed by zero_grads_except), unless ``zeroed`` now.
        kwargs = {"dtype": self.layout.dtype, "device": self.layout.device}
        if zeroed:
            self.flat_grad = torch.zeros(self.layout.numel, **kwargs)
        else:
            self.flat_grad = torch.empty(self.layout.numel, **kwargs)
            for start, stop in self._gaps:
                self.flat_grad[start:stop].zero_()
        self._grad_views = [alias(self.flat_grad, slot.offset, slot.shape) for slot in self.layout.slots]

    def grad_buffer(self) -> Tensor:
        """``flat_grad``, allocated again if it was released."""
        if self.flat_grad is None:
            self._allocate_grads()
        return self.flat_grad

    def grad_view(self, position: int) -> Tensor:
        """The parameter's range of ``flat_grad`` (allocating the buffer if it was released)."""
        self.grad_buffer()
        return self._grad_views[position]

    def grad_in_buffer(self, position: int) -> bool:
        grad = self.params[position].grad
        return grad is not None and bool(self._grad_views) and grad is self._grad_views[position]

    def take_grad(self, position: int, *, keep_large: bool = False) -> bool:
        """Bring the parameter's ``.grad`` into ``flat_grad``; return whether it has a gradient.

        A sparse gradient stays as it is (the algorithm's sparse path, or ``densify_grad``, takes it);
        with ``keep_large``, so does a large one this bucket ``keeps_large_grads`` for.
        """
        grad = self.params[position].grad
        if grad is None:
            return False
        if grad.is_sparse or self.grad_in_buffer(position) or not self.holds_param(position):
            return True  # (a parameter re-pointed elsewhere keeps its gradient until step() adopts it)
        if keep_large and self.keeps_large_grads and grad.numel() >= LARGE_GRAD_NUMEL and grad.is_contiguous():
            return True
        view = self.grad_view(position)
        with torch.no_grad():
            view.copy_(grad)
        self.params[position].grad = view
        return True

    def densify_grad(self, position: int) -> None:
        """Write the parameter's sparse ``.grad`` into ``flat_grad`` as dense values (``.grad`` stays sparse)."""
        view = self.grad_view(position)
        with torch.no_grad():
            view.zero_().add_(self.params[position].grad)

    def take_grads(self, *, keep_large: bool = False) -> list[int]:
        """``take_grad`` for every parameter; the positions that have a gradient (this is per step:
        gradients already in ``flat_grad``, the usual case, are found without a call per parameter)."""
        if self._grad_views and all(map(operator.is_, map(_grad_of, self.params), self._grad_views)):
            self.sparse_positions, self.kept_positions = set(), set()
            return list(range(len(self.params)))
        views = self._grad_views or [None] * len(self.params)
        present, sparse, kept = [], set(), set()
        for position, (param, view) in enumerate(zip(self.params, views)):
            grad = param.grad
            if grad is None:
                continue
            if grad is not view:
                if grad.is_sparse:
                    sparse.add(position)
                elif self.take_grad(position, keep_large=keep_large) and param.grad is not self._grad_views[position]:
                    kept.add(position)
            present.append(position)
        self.sparse_positions, self.kept_positions = sparse, kept
        return present

    def zero_grads_except(self, positions: Sequence[int]) -> None:
        """Zero the ``flat_grad`` ranges of every parameter not in ``positions`` (they may hold old values)."""
        if len(positions) == len(self.params):
            return
        present = set(positions)
        with torch.no_grad():
            for position in range(len(self.params)):
                if position not in present:
                    self.grad_view(position).zero_()

    def release_grads(self) -> None:
        """ZeRO-2: drop ``flat_grad``; every ``.grad`` that was a view of it becomes None."""
        for position, param in enumerate(self.params):
            if self.grad_in_buffer(position):
                param.grad = None
        self.flat_grad = None
        self._grad_views = []

    def grad_elsewhere(self, position: int) -> Tensor | None:
        """The parameter's dense gradient when it is not held in ``flat_grad`` (kept large, or hand-made)."""
        grad = self.params[position].grad
        if grad is None or grad.is_sparse or self.grad_in_buffer(position):
            return None
        return grad

    def runs(self, positions: Sequence[int]) -> list[Piece]:
        """Pieces of an unsharded bucket covering the slots of ``positions``, for a kernel over lists.

        Each maximal run of adjacent slots whose gradients are in ``flat_grad`` is one piece; each
        gradient held elsewhere is a piece of its own, with that gradient as a 1-D tensor.
        """
        pieces: list[Piece] = []
        previous = None
        for position in positions:
            slot, grad = self.layout.slots[position], self.grad_elsewhere(position)
            if grad is not None:
                pieces.append((slot.offset, slot.end, grad.view(-1)))
            elif pieces and pieces[-1][2] is None and previous == position - 1:
                pieces[-1] = (pieces[-1][0], slot.end, None)
            else:
                pieces.append((slot.offset, slot.end, None))
            previous = position
        return pieces

    # -- hooks ----------------------------------------------------------------------------------

    def ensure_hooks(self) -> None:
        """Give every parameter that requires grad and has none yet the gradient hooks."""
        ref = weakref.ref(self)
        for position, param in enumerate(self.params):
            if self._hooks[position] or not param.requires_grad:
                continue
            handles = [param.register_post_accumulate_grad_hook(_watcher(ref, position, "_ready"))]
            if self.on_grad_arriving is not None:
                handles.append(param.register_hook(_watcher(ref, position, "_arriving")))
            self._hooks[position] = handles

    def _arriving(self, position: int) -> None:
        self.on_grad_arriving(self, position)

    def _ready(self, position: int) -> None:
        # Sparse gradients are left where autograd made them: the algorithm decides at step().
        if self.params[position].grad.is_sparse:
            return
        if self.on_grad_ready is None:
            self.take_grad(position, keep_large=True)
        else:
            self.on_grad_ready(self, position)

    # -- the shard ------------------------------------------------------------------------------

    def segment_of(self, position: int) -> Segment | None:
        """The part of parameter ``position`` this rank owns, or None."""
        return self._segment_by_slot.get(position)

    def padding_numel(self) -> int:
        """Elements of the buffer that hold no parameter (alignment gaps and the tail)."""
        return sum(stop - start for start, stop in self._gaps)


def _gaps(layout: BucketLayout) -> list[tuple[int, int]]:
    """Ranges of the flat buffer between and after the slots."""
    gaps, end = [], 0
    for slot in layout.slots:
        if slot.offset > end:
            gaps.append((end, slot.offset))
        end = max(end, slot.end)
    if end < layout.numel:
        gaps.append((end, layout.numel))
    return gaps


def _watcher(bucket_ref: weakref.ref[FlatBucket], position: int, event: str) -> Callable[[Tensor], None]:
    """An autograd hook that calls the bucket's ``event`` method for its parameter ``position``; it holds
    the bucket weakly, so a dropped optimizer's hooks keep nothing alive."""
    def hook(_: Tensor) -> None:
        bucket = bucket_ref()
        if bucket is not None:
            getattr(bucket, event)(position)

    return hook


def _remove_hooks(hooks: list[list]) -> None:
    for handles in hooks:
        for handle in handles:
            handle.remove()
