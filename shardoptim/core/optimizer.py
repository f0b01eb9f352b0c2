"""``Optimizer``: torch.optim.Optimizer's contract, run on flat buckets."""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .bucket import FlatBucket
from .comm import Comm, LocalComm
from .compiled import CompiledUpdate
from .dispatch import Implementation, check_flags, resolve_implementation
from .hparams import validate
from .layout import ParamSpec, plan_buckets
from .rule import GroupView, UpdateRule
from .tensorlist import TensorList


class Optimizer(torch.optim.Optimizer):
    """Base class of shardoptim's algorithms; a ``torch.optim.Optimizer`` whose parameters live in flat buckets.

    Subclasses set ``rule`` (an ``UpdateRule``) and pass torch's defaults. Everything a torch user
    relies on is kept: constructor inputs and errors, ``param_groups``, ``state`` keyed by parameter
    with tensors shaped like it, step/state-dict hooks, torch-format ``state_dict()``, closures.

    What changes underneath: each param group's parameters are packed per (device, dtype) into flat
    buffers (``buckets``) and re-pointed to views of them, so one kernel updates a whole bucket.
    ``state[p]`` entries are views into the buckets' flat state.

    Args beyond torch's:
        process_group: ``None`` runs unsharded; a process group shards each bucket across its ranks.
        reduce_grads: average gradients across ranks in ``step()``; ``False`` when they already are
            (DDP, or a manual all-reduce).
    """

    rule: ClassVar[UpdateRule]

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        defaults: dict[str, Any],
        *,
        process_group: Any = None,
        reduce_grads: bool = True,
    ) -> None:
        self._comm: Comm = LocalComm() if process_group is None else _distributed_comm(process_group)
        self.reduce_grads = reduce_grads
        self._buckets: list[FlatBucket] = []
        self._param_count = 0
        super().__init__(params, defaults)

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
            validate(group, self.rule.checks)
            check_flags(group, has_fused=self.rule.fused is not None)
        except Exception:
            self.param_groups.pop()
            raise
        index = len(self.param_groups) - 1
        params = group["params"]
        specs = [ParamSpec.of(p, self._param_count + i, index) for i, p in enumerate(params)]
        by_index = {spec.index: p for spec, p in zip(specs, params)}
        for layout in plan_buckets(specs, world_size=self._comm.world_size):
            members = [by_index[slot.index] for slot in layout.slots]
            self._buckets.append(FlatBucket(layout, members, rank=self._comm.rank))
        self._param_count += len(params)

    # -- step -----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s value if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ready = [bucket.collect_grads() for bucket in self._buckets]
        if self.reduce_grads:
            self._comm.average_grads(self._buckets)
        for bucket, positions in zip(self._buckets, ready):
            if positions:
                self._update_bucket(bucket, positions)
        self._comm.gather_params(self._buckets)
        return loss

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
        for position in positions:
            bucket.steps[position] += 1
        if everyone:
            bucket.step_tensor.add_(1)
        else:
            bucket.step_tensor[positions] += 1
        for position in range(len(bucket.steps)) if new_names else positions:
            if bucket.steps[position] == 1 or (new_names and bucket.steps[position] > 0):
                self._expose_state(bucket, position, initial)

        step = bucket.steps[positions[0]]
        if everyone and implementation is not Implementation.FOR_LOOP and len(set(bucket.steps)) == 1:
            states = {name: [tensor] for name, tensor in bucket.state.items() if name in initial}
            self._run(bucket, implementation, [bucket.shard_param], [bucket.shard_grad], states,
                      [bucket.step_tensor[0]], h, step)
            return
        if implementation is Implementation.FUSED and isinstance(self.rule.fused, CompiledUpdate):
            implementation = Implementation.FOREACH  # see CompiledUpdate: compiled for whole shards only
        by_step: dict[int, list[int]] = defaultdict(list)
        for position in positions:
            if bucket.segment_of(position) is not None:
                by_step[bucket.steps[position]].append(position)
        for step, members in by_step.items():
            segments = [bucket.segment_of(position) for position in members]
            cut = lambda flat: [flat[s.start : s.stop] for s in segments]  # noqa: E731
            states = {name: cut(bucket.state[name]) for name in initial}
            steps = [bucket.step_tensor[position] for position in members]
            self._run(bucket, implementation, cut(bucket.shard_param), cut(bucket.shard_grad), states,
                      steps, h, step)

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
    ) -> None:
        if bucket.layout.dtype.is_complex:
            # Every algorithm treats a complex number as a pair of reals, as torch.optim does.
            as_real = lambda tensors: [torch.view_as_real(t) for t in tensors]  # noqa: E731
            params, grads = as_real(params), as_real(grads)
            states = {name: as_real(tensors) for name, tensors in states.items()}
        rule = self.rule
        if implementation is Implementation.FUSED:
            rule.fused(params, grads, states, steps, h, step)
            return
        c = rule.scalars(h, step)
        if implementation is Implementation.FOR_LOOP:
            for i, (p, g) in enumerate(zip(params, grads)):
                rule.update(p, g, types.SimpleNamespace(**{k: v[i] for k, v in states.items()}), h, c)
        elif len(params) == 1:
            rule.update(params[0], grads[0], types.SimpleNamespace(**{k: v[0] for k, v in states.items()}), h, c)
        else:
            s = types.SimpleNamespace(**{k: TensorList(v) for k, v in states.items()})
            rule.update(TensorList(params), TensorList(grads), s, h, c)

    def _expose_state(self, bucket: FlatBucket, position: int, initial: dict[str, float]) -> None:
        """Point ``self.state[param]`` at the views of one parameter's state, in torch's layout."""
        entry: dict[str, Tensor] = {}
        if self.rule.step_in_state:
            entry["step"] = bucket.step_tensor[position]
        for name in initial:
            view = bucket.state_view(name, position)
            if view is not None:
                entry[name] = view
        if entry:
            self.state[bucket.params[position]] = entry

    # -- state dict -----------------------------------------------------------------------------

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
            validate(merged, self.rule.checks)
            check_flags(merged, has_fused=self.rule.fused is not None)
            merged_groups.append(merged)

        # Saved indices follow the saved groups' "params" lists, matched in order to ours.
        owner = {id(p): (bucket, position) for bucket in self._buckets for position, p in enumerate(bucket.params)}
        targets = {}
        for group, saved in zip(merged_groups, saved_groups):
            initial = self.rule.state(GroupView(group))
            for param, index in zip(group["params"], saved["params"]):
                if index in saved_state:
                    targets[index] = (param, initial, _checked_entry(saved_state[index], param, initial, index))

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
            segment = bucket.segment_of(position)
            if segment is not None:
                for name in initial:
                    if name in entry:
                        flat = entry[name].reshape(-1)[segment.param_start : segment.param_start + segment.numel]
                        bucket.state[name][segment.start : segment.stop].copy_(flat)
            self._expose_state(bucket, position, initial)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __repr__(self) -> str:
        name = type(self).__name__
        elements = sum(bucket.layout.numel for bucket in self._buckets)
        summary = f"{len(self._buckets)} flat buckets, {elements} elements, world size {self._comm.world_size}"
        return f"{name} [{summary}]" + super().__repr__().removeprefix(name)


def _checked_entry(entry: dict[str, Any], param: Tensor, initial: dict[str, float], index: int) -> dict[str, Any]:
    """One parameter's saved state, checked against the parameter it is about to fill."""
    for name, value in entry.items():
        if name == "step":
            continue
        if name not in initial:
            raise ValueError(f"state of parameter {index} has an entry {name!r} this optimizer does not keep")
        if not isinstance(value, Tensor) or value.numel() != param.numel():
            size = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"state {name!r} of parameter {index} has size {size}, the parameter {tuple(param.shape)}"
            )
    return entry


def _distributed_comm(process_group: Any) -> Comm:
    raise NotImplementedError("sharding across ranks (process_group=...) is not available yet")
