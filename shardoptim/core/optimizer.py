"""``Optimizer``: torch.optim.Optimizer's contract, run on flat buckets."""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .bucket import FlatBucket
from .clip import clip_grad_norm
from .comm import Comm, LocalComm
from .compiled import CompiledUpdate
from .dispatch import Implementation, check_flags, resolve_implementation
from .distributed import distributed_comm
from .gather import gather_full_state
from .hparams import Check, validate
from .layout import BucketLayout, ParamSpec, plan_buckets
from .rule import GroupView, UpdateRule
from .tensorlist import run_eager


class Optimizer(torch.optim.Optimizer):
    """Base class of shardoptim's algorithms; a ``torch.optim.Optimizer`` whose parameters live in flat buckets.

    Subclasses set ``rule`` (an ``UpdateRule``) and pass torch's defaults. Everything a torch user
    relies on is kept: constructor inputs and errors, ``param_groups``, ``state`` keyed by parameter
    with tensors shaped like it, step/state-dict hooks, torch-format ``state_dict()``, closures.

    What changes underneath: each param group's parameters are packed per (device, dtype) into flat
    buffers (``buckets``) and re-pointed to views of them, so one kernel updates a whole bucket.
    ``state[p]`` entries are views into the buckets' flat state.

    Args beyond torch's:
        process_group: ``None`` runs unsharded; a process group shards each bucket across its ranks
            (see ``docs/distributed.md``). Every rank must then construct the optimizer with the same
            parameters in the same order (checked: a mismatch raises ``ValueError`` on every rank), and
            ``step()``, ``clip_grad_norm_()``, ``state_dict()`` and ``add_param_group()`` become
            collective calls.
        reduce_grads: average gradients across ranks in ``step()``; ``False`` when they already are
            (DDP, or a manual all-reduce).

    Sharded, a parameter is updated when it has a gradient on any rank; a rank where its ``.grad`` is
    None contributes zeros to the average, as DDP does for a parameter a rank's forward did not use.
    ``state[p]`` holds only the part of ``p``'s state this rank owns (1-D when it owns part of ``p``,
    absent when none); ``state_dict()`` gathers the full one.

    Algorithms that are not an elementwise update (LBFGS, SparseAdam) set ``rule = None`` and
    ``checks`` (their hyper-parameter checks) instead, override ``step()``, and keep torch's own
    per-parameter ``state`` (lists, Python numbers), which ``load_state_dict`` then loads as torch does.
    They may override ``_plan_buckets`` to pack their parameters differently, or not at all.
    """

    rule: ClassVar[UpdateRule | None]
    #: The hyper-parameter checks of an algorithm without a ``rule`` (a rule carries its own).
    checks: ClassVar[tuple[Check, ...]] = ()
    #: False for algorithms that need whole tensors (LBFGS, SparseAdam): with a process group they run
    #: replicated, every rank averaging the gradients and applying the same update.
    shardable: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        defaults: dict[str, Any],
        *,
        process_group: Any = None,
        reduce_grads: bool = True,
    ) -> None:
        self._comm: Comm = (
            LocalComm() if process_group is None else distributed_comm(process_group, sharded=self.shardable)
        )
        self.reduce_grads = reduce_grads
        self._buckets: list[FlatBucket] = []
        self._param_count = 0
        # Per bucket, the positions whose gradients clip_grad_norm_ already collected and averaged.
        self._prepared_grads: list[list[int]] | None = None
        self._constructed = False
        super().__init__(params, defaults)
        self._check_same_params(self.param_groups)
        self._constructed = True

    @property
    def buckets(self) -> tuple[FlatBucket, ...]:
        """The flat buckets, in the order of param groups."""
        return tuple(self._buckets)

    # -- groups ---------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch's checks, then this algorithm's hyper-parameter checks) and bucket it."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            if self._constructed:
                self._check_same_params([group])
        except Exception:
            self.param_groups.pop()
            raise
        index = len(self.param_groups) - 1
        params = group["params"]
        specs = [ParamSpec.of(p, self._param_count + i, index) for i, p in enumerate(params)]
        by_index = {spec.index: p for spec, p in zip(specs, params)}
        for layout in self._plan_buckets(specs):
            members = [by_index[slot.index] for slot in layout.slots]
            bucket = FlatBucket(layout, members, rank=self._comm.rank)
            # Only a torch kernel over lists can read gradients where autograd left them; sharded, the
            # gradients must be in flat_grad to be reduced.
            bucket.keeps_large_grads = isinstance(self._comm, LocalComm) and not (
                self.rule is None or self.rule.fused is None or isinstance(self.rule.fused, CompiledUpdate)
            )
            self._buckets.append(bucket)
        self._param_count += len(params)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise torch's error for an invalid hyper-parameter or flag of ``group``."""
        if self.rule is None:
            validate(group, self.checks)
            return
        validate(group, self.rule.checks)
        check_flags(group, has_fused=self.rule.fused is not None)

    def _plan_buckets(self, specs: Sequence[ParamSpec]) -> tuple[BucketLayout, ...]:
        """The flat buckets of one new param group's parameters."""
        return plan_buckets(specs, world_size=self._comm.world_size, bucket_cap_numel=self._comm.bucket_cap_numel)

    # -- step -----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s value if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._prepared_grads is not None:
            ready, average, self._prepared_grads = self._prepared_grads, False, None
        else:
            ready, average = self._collect_grads(keep_large=True), self.reduce_grads
        # Sharded: gradient averaging, the update of the own shard and the parameter gather, pipelined
        # over buckets. Unsharded: just the buckets that have gradients.
        for bucket, positions in self._comm.update_pipeline(self._buckets, ready, average_grads=average):
            self._update_bucket(bucket, positions)
        return loss

    @torch.no_grad()
    def gather_params(self) -> None:
        """Refresh every rank's full parameters from every rank's own shard of them.

        ``step()`` does this itself; call it after changing shards some other way (an EMA swapped in,
        a shard loaded). Collective when sharded; nothing to do otherwise.
        """
        self._comm.gather_params(self._buckets)

    def _check_same_params(self, groups: Sequence[dict[str, Any]]) -> None:
        """Fail on every rank, before any other collective, when ranks were given different parameters."""
        if isinstance(self._comm, LocalComm):
            return
        params = [p for group in groups for p in group["params"]]
        signature = "|".join(
            [type(self).__name__]
            + [",".join(f"{tuple(p.shape)}:{p.dtype}:{p.device.type}" for p in group["params"]) for group in groups]
        )
        self._comm.check_same_params(signature, [len(groups), len(params), sum(p.numel() for p in params)])

    def _collect_grads(self, *, keep_large: bool = False) -> list[list[int]]:
        """Per bucket, the positions with a gradient (on any rank), each gradient now in ``flat_grad``
        (with ``keep_large``, except those ``_update_bucket`` may pass to a fused kernel where they are)."""
        grads = [bucket.collect_grads(keep_large=keep_large) for bucket in self._buckets]
        return self._comm.agree_on_grads(self._buckets, grads)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also drops gradients ``clip_grad_norm_`` averaged for a step not taken."""
        self._prepared_grads = None
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip the gradients of all this optimizer's parameters by their global norm; return that norm.

        Equal (within float rounding) to ``torch.nn.utils.clip_grad_norm_`` over all the parameters of
        the unsharded model, including ``norm_type=inf``; ``norm_type`` must be positive or inf. Call it
        between ``backward()`` and ``step()``.

        Sharded, this is a collective call: it averages the gradients now (``step()`` then does not
        again), each rank takes the norm of its own shards, one ``all_reduce`` of a scalar combines
        them, and each rank scales its own shard of the gradient, which is what ``step()`` uses; the
        rest of ``.grad`` is neither averaged nor scaled. ``zero_grad()`` discards the prepared gradients.
        """
        ready = self._prepared_grads
        if ready is None:
            ready = self._collect_grads()
            if self.reduce_grads and not isinstance(self._comm, LocalComm):
                self._comm.average_grads([bucket for bucket, positions in zip(self._buckets, ready) if positions])
                self._prepared_grads = ready  # averaged in place: step() must not average them again
        return clip_grad_norm(
            self._buckets, ready, self._comm,
            max_norm=max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite,
        )

    def _update_bucket(self, bucket: FlatBucket, positions: list[int]) -> None:
        group = self.param_groups[bucket.layout.group]
        h = GroupView(group)
        initial = self.rule.state(h)
        new_names = initial.keys() - bucket.state.keys()
        bucket.ensure_state(initial)
        implementation = resolve_implementation(
            group, device=bucket.layout.device, has_fused=self.rule.fused is not None
        )

        everyone = len(positions) == len(bucket.steps)
        # torch creates a parameter's state at its first update, from the group as it is then (Rprop's
        # step_size starts at that step's lr): refill the slots starting now if their state is not new.
        carried = {name: value for name, value in initial.items() if name not in new_names}
        for position in positions:
            if carried and bucket.steps[position] == 0:
                bucket.reset_slot(position, carried)
            bucket.steps[position] += 1
        if everyone:
            bucket.step_tensor.add_(1)
        else:
            bucket.step_tensor[positions] += 1
        scalar_state = self._advance_scalar_state(bucket, positions, h)
        for position in range(len(bucket.steps)) if new_names else positions:
            if bucket.steps[position] == 1 or (new_names and bucket.steps[position] > 0):
                self._expose_state(bucket, position, initial)

        # Parameters at the same step with the same scalar state share one call of the update: the whole
        # shard when every gradient is in flat_grad, or (fused) the runs of flat_grad and the gradients
        # the bucket kept where autograd put them (see FlatBucket.keeps_large_grads).
        kinds = {position: (bucket.steps[position], scalar_state[position]) for position in positions}
        elsewhere = bucket.grads_elsewhere(positions)
        one_call = implementation is not Implementation.FOR_LOOP and len(set(kinds.values())) == 1
        if one_call and (implementation is Implementation.FUSED if elsewhere else everyone):
            pieces = bucket.runs(positions) if elsewhere else [(0, bucket.layout.shard_numel, None)]
            steps = [bucket.step_tensor[positions[0]]] * len(pieces)
            step, values = kinds[positions[0]]
            self._run_pieces(bucket, implementation, pieces, initial, steps, h, step, dict(values))
            return
        for position in elsewhere:
            bucket.adopt_grad(position)
        if implementation is Implementation.FUSED and isinstance(self.rule.fused, CompiledUpdate):
            implementation = Implementation.FOREACH  # see CompiledUpdate: compiled for whole shards only
        by_kind: dict[tuple[int, tuple[tuple[str, float], ...]], list[int]] = defaultdict(list)
        for position in positions:
            if bucket.segment_of(position) is not None:
                by_kind[kinds[position]].append(position)
        for (step, values), members in by_kind.items():
            pieces = [(s.start, s.stop, None) for s in map(bucket.segment_of, members)]
            steps = [bucket.step_tensor[position] for position in members]
            self._run_pieces(bucket, implementation, pieces, initial, steps, h, step, dict(values))

    def _run_pieces(
        self,
        bucket: FlatBucket,
        implementation: Implementation,
        pieces: list[tuple[int, int, Tensor | None]],
        initial: dict[str, float],
        steps: list[Tensor],
        h: GroupView,
        step: int,
        scalar_state: dict[str, float],
    ) -> None:
        """One update over ``(start, stop, grad)`` pieces of the shard; ``grad`` None: that slice of ``shard_grad``."""
        cut = lambda flat: [flat[start:stop] for start, stop, _ in pieces]  # noqa: E731
        grads = [bucket.shard_grad[start:stop] if grad is None else grad for start, stop, grad in pieces]
        states = {name: cut(bucket.state[name]) for name in initial}
        self._run(bucket, implementation, cut(bucket.shard_param), grads, states, steps, h, step, scalar_state)

    def _advance_scalar_state(
        self, bucket: FlatBucket, positions: list[int], h: GroupView
    ) -> dict[int, tuple[tuple[str, float], ...]]:
        """Each updating parameter's ``rule.scalar_state`` as this update sees it; stores the values after it.

        Runs once the step counts are incremented; a parameter's first update starts from step 0's values.
        """
        if self.rule.scalar_state is None:
            return dict.fromkeys(positions, ())
        starting = [position for position in positions if bucket.steps[position] == 1]
        if starting:
            bucket.set_scalar_state(starting, self.rule.scalar_state(h, 0))
        stored = {name: tensor.tolist() for name, tensor in bucket.scalar_state.items()}
        before = {position: tuple((name, stored[name][position]) for name in stored) for position in positions}
        by_kind: dict[tuple[int, tuple[tuple[str, float], ...]], list[int]] = defaultdict(list)
        for position in positions:
            by_kind[bucket.steps[position], before[position]].append(position)
        for (step, previous), members in by_kind.items():
            bucket.set_scalar_state(members, self.rule.scalar_state(h, step, **dict(previous)))
        return before

    def _run(
        self,
        bucket: FlatBucket,
        implementation: Implementation,
        params: list[Tensor],
        grads: list[Tensor],
        states: dict[str, list[Tensor]],
        steps: list[Tensor],
        h: GroupView,
        step: int,
        scalar_state: dict[str, float],
    ) -> None:
        if bucket.layout.dtype.is_complex:
            # Every algorithm treats a complex number as a pair of reals, as torch.optim does.
            as_real = lambda tensors: [torch.view_as_real(t) for t in tensors]  # noqa: E731
            params, grads = as_real(params), as_real(grads)
            states = {name: as_real(tensors) for name, tensors in states.items()}
        rule = self.rule
        if implementation is Implementation.FUSED:
            rule.fused(params, grads, states, steps, h, step, **scalar_state)
            return
        c = rule.scalars(h, step, **scalar_state)
        if implementation is Implementation.FOR_LOOP:
            for i, (p, g) in enumerate(zip(params, grads)):
                rule.update(p, g, types.SimpleNamespace(**{k: v[i] for k, v in states.items()}), h, c)
        else:
            run_eager(rule.update, params, grads, states, h, c)

    def _expose_state(self, bucket: FlatBucket, position: int, initial: dict[str, float]) -> None:
        """Point ``self.state[param]`` at the views of one parameter's state, in torch's layout."""
        entry: dict[str, Tensor] = {}
        if self.rule.step_in_state:
            entry["step"] = bucket.step_tensor[position]
        for name, values in bucket.scalar_state.items():
            entry[name] = values[position]
        for name in initial:
            view = bucket.state_view(name, position)
            if view is not None:
                entry[name] = view
        if entry:
            self.state[bucket.params[position]] = entry

    # -- state dict -----------------------------------------------------------------------------

    def state_dict(self, *, rank0_only: bool = False) -> dict[str, Any]:
        """torch's state dict: ``{"state": {index: {name: tensor shaped like the param}}, "param_groups": ...}``.

        Sharded, this is a collective call that gathers the full state: one collective per (bucket,
        state name), no pickling. By default every rank receives the full state dict; with
        ``rank0_only=True`` only group rank 0 does and every other rank gets ``{}``. Unsharded (or
        replicated), every rank already holds the full state and returns it; ``rank0_only`` is ignored.

        Sharded state tensors are views of one flat tensor per (bucket, state name): save the dict whole
        (as ``torch.save`` does), and copy what you extract from it.
        """
        if self._comm.world_size == 1:
            return super().state_dict()
        names = []
        for bucket in self._buckets:
            initial = self.rule.state(GroupView(self.param_groups[bucket.layout.group]))
            names.append([name for name in initial if name in bucket.state])
        full = gather_full_state(self._buckets, self.state, names, self._comm, dst=0 if rank0_only else None)
        if rank0_only and self._comm.rank != 0:
            return {}
        own, self.state = self.state, defaultdict(dict, full)
        try:
            return super().state_dict()
        finally:
            self.state = own

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a torch-format state dict (from shardoptim or torch.optim) into the flat buckets.

        Everything is checked before anything changes: a state dict with another number of groups,
        other group sizes, state tensors of the wrong size or invalid hyper-parameters raises
        ``ValueError`` and leaves the optimizer as it was.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            replaced = hook(self, state_dict)
            if replaced is not None:
                state_dict = replaced
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has a different number of parameter groups: "
                f"{len(saved_groups)} saved, {len(self.param_groups)} in this optimizer"
            )
        merged_groups = []
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group that doesn't match the size of "
                    f"optimizer's group: group {i} has {len(saved['params'])} saved parameters, "
                    f"{len(group['params'])} here"
                )
            merged = {**saved, "params": group["params"]}
            self._check_group(merged)
            merged_groups.append(merged)
        if self.rule is None:
            self._load_per_parameter_state(merged_groups, saved_groups, saved_state)
            for hook in self._optimizer_load_state_dict_post_hooks.values():
                hook(self)
            return

        # Saved indices follow the saved groups' "params" lists, matched in order to ours.
        owner = {id(p): (bucket, position) for bucket in self._buckets for position, p in enumerate(bucket.params)}
        targets = {}
        for group, saved in zip(merged_groups, saved_groups):
            initial = self.rule.state(GroupView(group))
            scalars = self.rule.scalar_state(GroupView(group), 0) if self.rule.scalar_state else {}
            scalar_keys = {"step", *scalars}
            for param, index in zip(group["params"], saved["params"]):
                if index in saved_state:
                    entry = _checked_entry(saved_state[index], param, initial, scalar_keys, index)
                    targets[index] = (param, initial, entry)

        for group, merged in zip(self.param_groups, merged_groups):
            group.update({key: value for key, value in merged.items() if key != "params"})
        self.state = defaultdict(dict)
        for bucket in self._buckets:
            initial = self.rule.state(GroupView(self.param_groups[bucket.layout.group]))
            bucket.ensure_state(initial)
            for position in range(len(bucket.params)):
                bucket.reset_slot(position, initial)
        for param, initial, entry in targets.values():
            bucket, position = owner[id(param)]
            steps = int(entry["step"]) if "step" in entry else 1
            bucket.steps[position] = steps
            bucket.step_tensor[position] = steps
            if self.rule.scalar_state is not None:
                # Saved values win over derived ones: they reflect the lr of the saved run's last step.
                derived = self.rule.scalar_state(GroupView(self.param_groups[bucket.layout.group]), steps)
                bucket.set_scalar_state([position], {k: float(entry.get(k, v)) for k, v in derived.items()})
            segment = bucket.segment_of(position)
            if segment is not None:
                for name in initial:
                    if name in entry:
                        flat = entry[name].reshape(-1)[segment.param_start : segment.param_start + segment.numel]
                        bucket.state[name][segment.start : segment.stop].copy_(flat)
            self._expose_state(bucket, position, initial)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_per_parameter_state(
        self, merged_groups: list[dict[str, Any]], saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any]
    ) -> None:
        """Adopt checked groups and torch-format state as torch does: tensors cast like their parameter."""
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for group, saved in zip(merged_groups, saved_groups):
            for param, index in zip(group["params"], saved["params"]):
                if index in saved_state:
                    state[param] = {
                        name: value if name == "step" else _cast_like(param, value)
                        for name, value in saved_state[index].items()
                    }
        for group, merged in zip(self.param_groups, merged_groups):
            group.update({key: value for key, value in merged.items() if key != "params"})
        self.state = state

    def __repr__(self) -> str:
        name = type(self).__name__
        elements = sum(bucket.layout.numel for bucket in self._buckets)
        summary = f"{len(self._buckets)} flat buckets, {elements} elements, world size {self._comm.world_size}"
        return f"{name} [{summary}]" + super().__repr__().removeprefix(name)


def _cast_like(param: Tensor, value: Any) -> Any:
    """``value`` with every tensor in it (also inside lists and dicts) on ``param``'s device, and in its
    dtype when ``param`` is real floating point: torch's rule for loaded state."""
    if isinstance(value, Tensor):
        return value.to(dtype=param.dtype, device=param.device) if param.is_floating_point() else value.to(param.device)
    if isinstance(value, dict):
        return {key: _cast_like(param, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_like(param, item) for item in value)
    return value


def _checked_entry(
    entry: dict[str, Any], param: Tensor, initial: dict[str, float], scalar_keys: set[str], index: int
) -> dict[str, Any]:
    """One parameter's saved state, checked against the parameter it is about to fill."""
    for name, value in entry.items():
        if name in scalar_keys:
            if not (isinstance(value, (int, float)) or isinstance(value, Tensor) and value.numel() == 1):
                raise ValueError(f"state {name!r} of parameter {index} must be a number or a one-element tensor")
            continue
        if name not in initial:
            raise ValueError(f"state of parameter {index} has an entry {name!r} this optimizer does not keep")
        if not isinstance(value, Tensor) or value.numel() != param.numel():
            size = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"state {name!r} of parameter {index} has size {size}, the parameter {tuple(param.shape)}"
            )
    return entry
