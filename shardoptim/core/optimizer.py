"""``Optimizer``: torch.optim.Optimizer's contract, run on flat buckets, sharded across ranks when asked."""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .bucket import FlatBucket
from .clip import clip_grad_norm
from .comm import Comm, LocalComm
from .config import ShardingConfig
from .differentiable import step_parameter
from .dispatch import Implementation, check_flags, choose_implementation, run_update
from .full_state import gather_full_state, gather_owned_state
from .grad_sync import GradSync
from .hparams import Check, validate
from .layout import BucketLayout, ParamSpec, plan_buckets, plan_tensor_buckets
from .master import check_state_dtype, master_rule, state_dtype_for
from .memory import MemoryReport, memory_report
from .rule import HyperParams, UpdateRule
from .shard_state import ShardState, scalar_dtype
from .tensor_rule import TensorRule
from .state_dicts import (
    load_bucketed_state, load_per_parameter_state, merged_group, read_shard_state, shard_state,
)


class Optimizer(torch.optim.Optimizer):
    """Base class of shardoptim's algorithms; a ``torch.optim.Optimizer`` whose parameters live in flat buckets.

    Subclasses set ``rule`` (an ``UpdateRule``) and pass torch's defaults. Everything a torch user
    relies on is kept: constructor inputs and errors, ``param_groups``, ``state`` keyed by parameter
    with tensors shaped like it, step/state-dict hooks, torch-format ``state_dict()``, closures,
    ``deepcopy`` and pickling.

    Underneath, each param group's parameters are packed per (device, dtype, requires_grad) into
    flat buffers (``buckets``), each parameter re-pointed to its range of one (as a tensor with a
    storage of its own, so ``torch.save``, safetensors and accelerate see ordinary parameters), and
    one kernel updates a whole bucket. ``state[p]`` entries are views into the buckets' state. A group
    with ``differentiable=True`` is not packed: it runs per parameter inside autograd, as torch does.

    Args beyond torch's:
        process_group: ``None`` runs unsharded; a process group shards each bucket across its ranks
            (``docs/distributed.md``). Every rank must then build the optimizer with the same
            parameters in the same order (checked: a mismatch raises ``ValueError`` on every rank),
            and ``step()``, ``clip_grad_norm_()``, ``state_dict()``, ``gather_params()`` and
            ``add_param_group()`` become collective calls.
        reduce_grads: average gradients across ranks; ``False`` when they already are (DDP).
        sharding: a ``ShardingConfig``: bucket cap, collectives, ZeRO-2, overlap with backward.
        state_dtype: ``None`` keeps the state in each parameter's dtype, as torch.optim. A wider
            floating point dtype (``torch.float32`` for a bfloat16 or float16 model) keeps the state of
            narrower parameters in it, with a master copy of them (see below); parameters already that
            wide are unaffected. ``ValueError`` for a dtype narrower than a parameter's, one that is not
            floating point, ``differentiable=True``, and the algorithms without an elementwise rule.

    With ``state_dtype``, a bucket of narrower parameters keeps every state tensor in ``state_dtype``
    and one more, ``state[p]["master_param"]``: ``p`` in ``state_dtype``, sharded like the rest of
    the state (``state_dtype.itemsize`` bytes per parameter, over N ranks). The update runs on the
    master, as it would on parameters of that dtype, from the gradient upcast (gradients stay in the
    parameters' dtype, and are averaged across ranks in it); then ``p`` holds the master rounded to
    its dtype. The master is what lets updates smaller than ``p``'s rounding step add up. It starts
    as a copy of ``p`` (at ``p``'s first update, and when a loaded state dict has none), and where
    ``p`` no longer equals the master rounded at a step (``model.load_state_dict``, an in-place edit
    of ``p``), it restarts from ``p`` there. ``state_dict()`` and checkpoints carry it; a state dict
    with a master loads into an optimizer without one, which ignores it. The fused implementation
    (the default) of such a bucket is the update compiled, for every algorithm: torch's fused kernels
    take one dtype for parameters, gradients and state.

    Sharded, a parameter is updated when it has a gradient on any rank; a rank where its ``.grad`` is
    None contributes zeros to the average, as DDP does for a parameter a rank's forward did not use.
    ``state[p]`` holds only the part of ``p``'s state this rank owns (1-D when it owns part of ``p``,
    only ``step`` and scalars when none); ``state_dict()`` gathers the full one and
    ``shard_state_dict()`` returns this rank's own without a collective.

    Matrix algorithms (Muon, Adafactor) set ``tensor_rule`` (a ``TensorRule``) and ``checks``
    instead of ``rule``: their buckets are whole-tensor partitions (each parameter owned by one rank,
    ranks balanced on the rule's update cost), ``state[p]`` is torch's per-parameter state, kept by
    ``p``'s owner, and the step's phases are the same, with phase 3 updating each owned parameter
    whole. Algorithms that are neither (LBFGS, SparseAdam) set ``rule = None`` and ``checks``,
    override ``step()`` and keep torch's own per-parameter ``state``; they may override
    ``_plan_buckets`` to pack their parameters differently, or not at all.
    """

    rule: ClassVar[UpdateRule | None]
    tensor_rule: ClassVar[TensorRule | None] = None
    #: The hyper-parameter checks of an algorithm without a ``rule`` (a rule carries its own).
    checks: ClassVar[tuple[Check, ...]] = ()
    #: False for algorithms that need whole tensors (LBFGS, SparseAdam): with a process group they run
    #: replicated, every rank averaging the gradients and applying the same update.
    shardable: ClassVar[bool] = True
    #: torch creates this algorithm's state in the constructor, not at a parameter's first update
    #: (Adagrad): ``state`` then shows step 0 and the initial values from the start, and after loads.
    state_at_construction: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        defaults: dict[str, Any],
        *,
        process_group: Any = None,
        reduce_grads: bool = True,
        sharding: ShardingConfig | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        # torch validates its arguments before it looks at the parameters.
        self._check_group(defaults)
        self._setup(process_group, reduce_grads, sharding, state_dtype)
        super().__init__(params, defaults)
        self._check_same_params(self.param_groups)
        self._constructed = True
        self._after_construction()

    def _setup(
        self, process_group: Any, reduce_grads: bool, sharding: ShardingConfig | None, state_dtype: torch.dtype | None
    ) -> None:
        check_state_dtype(state_dtype)
        if state_dtype is not None and self.rule is None:
            raise ValueError(
                f"{type(self).__name__} does not support state_dtype={state_dtype}: it keeps torch's per-parameter "
                f"state, in the parameters' dtype"
            )
        self.state_dtype = state_dtype
        if sharding is None:
            sharding = ShardingConfig()
        if not isinstance(sharding, ShardingConfig):
            raise TypeError(f"sharding must be a shardoptim.ShardingConfig, got {type(sharding).__name__}")
        if not isinstance(reduce_grads, bool):
            raise TypeError(f"reduce_grads must be a bool, got {reduce_grads!r}")
        self.sharding = sharding
        self._comm: Comm = _comm_for(process_group, sharding)
        self._shards = self._comm.world_size if self.shardable else 1
        self._buckets: list[FlatBucket] = []
        self._param_count = 0
        self._sync = GradSync(self._buckets, self._comm, sharding, average=reduce_grads, sharded=self._shards > 1)
        self._step_tensors: dict[torch.device, Tensor] = {}
        self._constructed = False
        self._warned_unagreed_scale = False
        if self._shards > 1:
            # torch.amp.GradScaler then always calls step() and leaves the skip to it (found_inf):
            # a rank must not skip a step, whose collectives its peers run, on its own inf.
            self._step_supports_amp_scaling = True

    def _after_construction(self) -> None:
        """Called once the groups are in place (also after unpickling); algorithms may add to it."""
        self._expose_initial_state()

    def _expose_initial_state(self) -> None:
        """With ``state_at_construction``: every parameter without state gets its initial state."""
        if not self.state_at_construction:
            return
        for bucket in self._buckets:
            initial = self._bucket_rule(bucket).state(HyperParams.of(self.param_groups[bucket.layout.group]))
            bucket.state.allocate(initial)
            for position, param in enumerate(bucket.params):
                if param not in self.state:
                    self._expose_state(bucket, position, initial)

    @property
    def buckets(self) -> tuple[FlatBucket, ...]:
        """The flat buckets, in the order of param groups."""
        return tuple(self._buckets)

    @property
    def comm(self) -> Comm:
        """The collectives of this optimizer's ranks (``LocalComm`` without a process group): what
        checkpoints and other collective helpers use to agree with the other ranks."""
        return self._comm

    @property
    def reduce_grads(self) -> bool:
        """Whether ``step()`` averages gradients across ranks (``False`` under DDP)."""
        return self._sync.average

    @reduce_grads.setter
    def reduce_grads(self, value: bool) -> None:
        self._sync.average = bool(value)

    # -- groups ---------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch's checks, then this algorithm's hyper-parameter checks) and bucket it."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            self._check_state_dtype(len(self.param_groups) - 1)
            if self._constructed:
                self._check_same_params([group])
        except Exception:
            self.param_groups.pop()
            raise
        self._place_group(len(self.param_groups) - 1)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise torch's error for an invalid hyper-parameter or flag of ``group``."""
        if self.rule is None:
            validate(group, self.checks)
            return
        validate(group, self.rule.checks)
        check_flags(group)

    def _check_state_dtype(self, index: int) -> None:
        """Raise ``ValueError`` when ``state_dtype`` cannot be honoured for param group ``index``."""
        if self.state_dtype is None:
            return
        group = self.param_groups[index]
        if group.get("differentiable"):
            raise ValueError(
                f"state_dtype={self.state_dtype} is not supported with differentiable=True (param group {index}): "
                f"such a group keeps torch's per-parameter state, in the parameters' dtype"
            )
        for param in group["params"]:
            self._bucket_state_dtype(param.dtype, lambda: self._param_name(index, param))

    def _bucket_state_dtype(self, dtype: torch.dtype, name: Callable[[], str]) -> torch.dtype:
        """The state dtype of a bucket of ``dtype``; ``ValueError`` naming ``name()`` if it has none."""
        try:
            return state_dtype_for(dtype, self.state_dtype)
        except ValueError as error:
            raise ValueError(f"{name()}: {error}") from None

    def _bucket_rule(self, bucket: FlatBucket) -> UpdateRule:
        """The rule that updates ``bucket``: the algorithm's, run on a master copy when the bucket keeps one."""
        return master_rule(self.rule) if bucket.state.keeps_master else self.rule

    def _per_parameter(self, group: dict[str, Any]) -> bool:
        """Whether ``group`` keeps torch's per-parameter state instead of buckets."""
        return self.rule is not None and bool(group.get("differentiable"))

    def _place_group(self, index: int) -> None:
        group = self.param_groups[index]
        by_index: dict[int, Tensor] = {}  # each parameter at the index of its first listing
        seen: set[int] = set()
        for i, param in enumerate(group["params"]):
            if id(param) not in seen:
                seen.add(id(param))
                by_index[self._param_count + i] = param
        self._param_count += len(group["params"])
        if self._per_parameter(group):
            return
        specs = [ParamSpec.of(param, i, index) for i, param in by_index.items()]
        for layout in self._plan_buckets(specs):
            self._buckets.append(self._make_bucket(layout, [by_index[slot.index] for slot in layout.slots]))
        self._sync.buckets_changed()

    def _make_bucket(self, layout: BucketLayout, params: list[Tensor]) -> FlatBucket:
        bucket = FlatBucket(
            layout, params, rank=self._comm.rank if layout.is_sharded else 0,
            shard_grads=self.sharding.shard_grads, on_grad_ready=self._sync.grad_ready,
            on_grad_arriving=self._sync.grad_arriving if self._sync.overlaps else None,
            state_dtype=self._bucket_state_dtype(layout.dtype, lambda: self._param_name(layout.group, params[0])),
        )
        # torch warns of a parameter listed twice in a group and updates it once per listing.
        listings = Counter(map(id, self.param_groups[layout.group]["params"]))
        bucket.repeats = {position: listings[id(p)] - 1 for position, p in enumerate(params) if listings[id(p)] > 1}
        # Only a torch kernel over lists can read gradients where autograd left them; sharded, the
        # gradients must be in flat_grad to be averaged.
        bucket.keeps_large_grads = (not layout.is_sharded and self.rule is not None and self.rule.kernel is not None
                                    and not self.owns_whole_tensors(self.param_groups[layout.group]))
        return bucket

    @classmethod
    def owns_whole_tensors(cls, group: Mapping[str, Any]) -> bool:
        """Whether param group ``group`` runs the matrix algorithm (``tensor_rule``): whole-tensor
        partitions, per-parameter state kept by each parameter's owner. Every group of Muon and
        Adafactor; the Muon groups of ``MuonAdamW``."""
        return cls.tensor_rule is not None and cls.rule is None

    @classmethod
    def initial_bucket_state(cls, group: Mapping[str, Any]) -> dict[str, float]:
        """The value each of a param group's bucket state tensors starts at (none for a matrix
        algorithm's group, whose state is per parameter)."""
        if cls.rule is None or cls.owns_whole_tensors(group):
            return {}
        return dict(cls.rule.state(HyperParams.of(group)))

    def _whole(self, bucket: FlatBucket) -> bool:
        return self.owns_whole_tensors(self.param_groups[bucket.layout.group])

    def _plan_buckets(self, specs: Sequence[ParamSpec]) -> tuple[BucketLayout, ...]:
        if not specs:
            return ()
        return self.plan_group_buckets(specs, self.param_groups[specs[0].group], world_size=self._shards,
                                       bucket_cap_numel=self.sharding.bucket_cap_numel)

    @classmethod
    def plan_group_buckets(
        cls, specs: Sequence[ParamSpec], group: Mapping[str, Any], *, world_size: int, bucket_cap_numel: int | None
    ) -> tuple[BucketLayout, ...]:
        """The buckets of one param group's parameters at ``world_size`` ranks: flat partitions, or
        whole-tensor ones for a matrix algorithm's group. What construction plans, and what an offline
        reshard must plan alike for a checkpoint to load bit for bit."""
        sharded = world_size > 1
        cap = bucket_cap_numel if sharded else None
        if cls.owns_whole_tensors(group):
            return plan_tensor_buckets(specs, world_size=world_size, cost=cls.tensor_rule.cost,
                                       bucket_cap_numel=cap, backward_order=sharded)
        return plan_buckets(specs, world_size=world_size, bucket_cap_numel=cap, backward_order=sharded)

    def _param_name(self, group_index: int, param: Tensor) -> str:
        group = self.param_groups[group_index]
        position = next(i for i, p in enumerate(group["params"]) if p is param)
        if "param_names" in group:
            return f"parameter {group['param_names'][position]!r}"
        return f"parameter {position} of param group {group_index} (shape {tuple(param.shape)})"

    def _check_same_params(self, groups: Sequence[dict[str, Any]]) -> None:
        """Fail on every rank, before any other collective, when ranks were given different parameters."""
        comm = self._comm
        if comm.world_size == 1:
            return
        params = [p for group in groups for p in group["params"]]
        signature = "|".join(
            [type(self).__name__, str(self.state_dtype)]  # ranks with other state tensors would hang in state_dict()
            + [",".join(f"{tuple(p.shape)}:{p.dtype}:{p.device.type}" for p in group["params"]) for group in groups]
        )
        row = [zlib.crc32(signature.encode()), len(groups), len(params), sum(p.numel() for p in params)]
        table = torch.zeros(comm.world_size, len(row), dtype=torch.int64, device=comm.small_device)
        table[comm.rank] = torch.tensor(row, dtype=torch.int64)
        comm.launch_reduce(table, "sum", label="the check that every rank has the same parameters").wait()
        rows = table.tolist()
        if all(other == rows[0] for other in rows):
            return
        described = "; ".join(
            f"rank {rank}: {groups} groups, {count} parameters, {numel} elements"
            for rank, (_, groups, count, numel) in enumerate(rows)
        )
        differing = [rank for rank, other in enumerate(rows) if other != rows[0]]
        raise ValueError(
            f"ranks of the process group were given different parameters ({described}); ranks {differing} "
            f"differ from rank 0 in count, shape, dtype or order (or state_dtype). Every rank must pass the "
            f"same parameters in the same order."
        )

    # -- step -----------------------------------------------------------------------------------

    # torch.compile(opt.step), torch's recipe for fusing an optimizer, runs this as it is: the update is
    # already one fused or compiled kernel per bucket, and the bookkeeping around it is not graph code.
    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s value if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._check_params()
            if self._skips_for_inf():
                self._sync.end_step()
                return loss
            self._step_buckets()
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            self._step_per_parameter()
        return loss

    def _skips_for_inf(self) -> bool:
        """Whether ``torch.amp.GradScaler`` found an inf or NaN gradient on any rank (``found_inf``,
        which it sets on a sharded optimizer before ``step()``): then no rank updates anything."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return False
        local = float(found_inf)
        agreed = torch.tensor([local], dtype=torch.float32, device=self._comm.small_device)
        self._comm.launch_reduce(agreed, "max", label=f"step {self._sync.steps_taken + 1}: the inf check").wait()
        if (agreed.item() > 0) != (local > 0) and not self._warned_unagreed_scale:
            self._warned_unagreed_scale = True
            warnings.warn(
                "another rank found an inf/NaN gradient, so every rank skips this step, but this rank's "
                "torch.amp.GradScaler did not see it and will not lower its scale: use "
                "shardoptim.amp.GradScaler with a sharded optimizer so every rank adjusts the scale alike",
                RuntimeWarning, stacklevel=3,
            )
        return agreed.item() > 0

    def _inverse_grad_scale(self) -> Tensor | None:
        """``1 / grad_scale`` when ``torch.amp.GradScaler`` left this step's gradients scaled, else None."""
        scale = getattr(self, "grad_scale", None)
        return None if scale is None else scale.double().reciprocal().float()

    def _step_buckets(self) -> None:
        """Every bucket with gradients, through the phases of a step:

        1. gradients ready, and agreed across ranks (``GradSync.collect``);
        2. the gradient average launched, then waited for (``GradSync.averaged``; with
           ``overlap_grad_reduce`` most were launched during backward);
        3. the update of this rank's shard;
        4. the parameter gather launched (while later buckets update), then waited for.

        Unsharded, 2 and 4 have nothing to do.
        """
        ready = self._sync.collect()
        inverse_scale = self._inverse_grad_scale()
        gathers = []
        for index in self._sync.averaged(ready):
            bucket = self._buckets[index]
            if inverse_scale is not None:
                bucket.shard_grad.mul_(inverse_scale.to(bucket.shard_grad.device))
            self._update_shard(index, ready[index])
            label = f"step {self._sync.steps_taken + 1}: the parameter gather of bucket {index}"
            gathers.append(self._comm.launch_gather(bucket.flat_param, bucket.shard_param, bounds=bucket.layout.bounds, label=label))
        for gather in gathers:
            gather.wait()
        self._sync.end_step()
        self._sync.steps_taken += 1

    def _update_shard(self, index: int, positions: list[int]) -> None:
        """Phase 3 for one bucket: its state advanced, then the update run over the shard's pieces."""
        bucket = self._buckets[index]
        if self._whole(bucket):
            self._update_tensors(index, positions)
            return
        rule = self._bucket_rule(bucket)
        group = self.param_groups[bucket.layout.group]
        sparse = bucket.sparse_positions.intersection(positions) if bucket.sparse_positions else set()
        if sparse and rule.sparse_update is None:
            raise RuntimeError(rule.sparse_error)
        if bucket.is_sharded:
            sparse = set()  # GradSync densified them into flat_grad to average them: the dense update applies
        h = HyperParams.of(group)
        initial = rule.state(h)
        implementation = choose_implementation(group, bucket.layout.device, bucket.state.dtype, rule)
        for members in _rounds(positions, bucket.repeats):
            for (step, before, after), kind in self._advance_state(bucket, members, h, initial).items():
                c = rule.scalars(h, step) if rule.scalar_state is None else rule.scalars(
                    h, step, before=dict(before), after=dict(after)
                )
                self._run(bucket, implementation, [p for p in kind if p not in sparse] if sparse else kind,
                          initial, h, step, c)
                for position in sparse.intersection(kind) if sparse else ():
                    self._run_sparse(bucket, position, initial, h, c)
        everything = len(positions) == len(bucket.params)
        torch.autograd.graph.increment_version(bucket.params if everything else [bucket.params[p] for p in positions])

    def _update_tensors(self, index: int, positions: list[int]) -> None:
        """Phase 3 for one bucket of a matrix algorithm: each parameter this rank owns, updated whole
        from its averaged gradient, its state created at its first update as torch creates it."""
        bucket, rule = self._buckets[index], self.tensor_rule
        sparse = bucket.sparse_positions.intersection(positions)
        if sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        # A tensor lr stays a tensor, as torch's matrix algorithms keep it (their arithmetic rounds so).
        h = HyperParams.of(self.param_groups[bucket.layout.group], keep_tensors=True)
        for position in positions:
            segment = bucket.segment_of(position)
            if segment is None:
                continue  # another rank's
            shape, param = bucket.layout.slots[position].shape, bucket.params[position]
            p = bucket.shard_param[segment.start : segment.stop].view(shape)
            g = bucket.shard_grad[segment.start : segment.stop].view(shape)
            state = self.state[param]
            if not state:
                state.update(rule.init_state(p, h))
            for _ in range(1 + bucket.repeats.get(position, 0)):
                rule.update(p, g, state, h)
        torch.autograd.graph.increment_version([bucket.params[p] for p in positions])

    def _run(
        self, bucket: FlatBucket, implementation: Implementation, members: list[int],
        initial: dict[str, float], h: HyperParams, step: int, c: Any,
    ) -> None:
        """One update call over the pieces of the shard that ``members`` cover."""
        if not members:
            return
        elsewhere = [p for p in members if p in bucket.kept_positions] if bucket.kept_positions else []
        if elsewhere and implementation is Implementation.FUSED:
            pieces = bucket.runs(members)
        else:
            for position in elsewhere:
                bucket.take_grad(position)
            whole = len(members) == len(bucket.params) and implementation is not Implementation.FOR_LOOP
            if whole:
                pieces = [(0, bucket.shard_param.numel(), None)]
            else:
                pieces = [(s.start, s.stop, None) for s in map(bucket.segment_of, members) if s is not None]
                if implementation is Implementation.COMPILED:
                    implementation = Implementation.FOREACH  # compiled for whole shards only (see CompiledUpdate)
        if not pieces:
            return
        cut = lambda flat: [flat[start:stop] for start, stop, _ in pieces]  # noqa: E731
        grads = [bucket.shard_grad[start:stop] if grad is None else grad for start, stop, grad in pieces]
        states = {name: cut(bucket.state.tensors[name]) for name in initial}
        # Only torch's fused kernels read the step from a tensor.
        steps = [self._step_tensor(bucket.layout.device, step)] * len(pieces) if implementation is Implementation.FUSED else []
        run_update(implementation, self._bucket_rule(bucket), cut(bucket.shard_param), grads, states, steps, h, step, c)

    def _run_sparse(self, bucket: FlatBucket, position: int, initial: dict[str, float], h: HyperParams, c: Any) -> None:
        """The rule's sparse path for one parameter of an unsharded bucket (``nn.Embedding(sparse=True)``)."""
        segment = bucket.segment_of(position)
        param = bucket.params[position]
        s = {name: bucket.state.view(name, segment) for name in initial}
        self._bucket_rule(bucket).sparse_update(param.data, param.grad, types.SimpleNamespace(**s), h, c)

    def _step_tensor(self, device: torch.device, step: int) -> Tensor:
        """A 0-D tensor holding ``step`` where torch's fused kernels read it."""
        tensor = self._step_tensors.get(device)
        if tensor is None:
            tensor = self._step_tensors[device] = torch.zeros((), dtype=torch.float32, device=device)
        return tensor.fill_(step)

    def _advance_state(
        self, bucket: FlatBucket, positions: list[int], h: HyperParams, initial: dict[str, float]
    ) -> dict[tuple[int, tuple, tuple], list[int]]:
        """Count one update of ``positions`` and bring their state where torch would have it.

        torch creates a parameter's state at its first update, from the group as it is then (Rprop's
        ``step_size`` starts at that step's ``lr``): a slot starting now is refilled when the state
        tensors already existed. Returns the positions grouped by (step, scalar state before, after),
        the kinds that share one update call.
        """
        state = bucket.state
        created = state.allocate(initial)
        steps = state.count_steps(positions)
        uniform = steps[0] == steps[-1] and len(set(steps)) == 1
        if uniform:
            starting = positions if steps[0] == 1 else []
        else:
            starting = [position for position, step in zip(positions, steps) if step == 1]
        carried = {name: value for name, value in initial.items() if name not in created}
        if carried:
            for position in starting:
                state.reset(bucket.segment_of(position), carried)
        if self.rule.scalar_state is None and uniform:
            kinds = {(steps[0], (), ()): positions}  # the usual step: one kind, one update call
        else:
            kinds = defaultdict(list)
            for position, kind in zip(positions, self._advance_scalar_state(state, positions, steps, h)):
                kinds[kind].append(position)
        if created:
            counts = state.steps.tolist()
            starting = [position for position in range(len(bucket.params)) if counts[position] > 0]
        for position in starting:
            self._expose_state(bucket, position, initial)
        return kinds

    def _advance_scalar_state(
        self, state: ShardState, positions: list[int], steps: list[int], h: HyperParams
    ) -> list[tuple]:
        """Per position: (step, scalar state before this update, after it), the scalars as numbers."""
        rule = self.rule
        if rule.scalar_state is None:
            return [(step, (), ()) for step in steps]
        starting = [position for position, step in zip(positions, steps) if step == 1]
        if starting:
            state.set_scalars(starting, rule.scalar_state(h, 0))
        names = list(state.scalars)
        values = {name: state.scalars[name].tolist() for name in names}
        groups: dict[tuple[int, tuple], list[int]] = defaultdict(list)
        for position, step in zip(positions, steps):
            groups[step, tuple(values[name][position] for name in names)].append(position)
        result: dict[int, tuple] = {}
        for (step, previous), members in groups.items():
            before_tensors = {name: state.scalars[name][members[0]].clone() for name in names}
            state.set_scalars(members, rule.scalar_state(h, step, **before_tensors))
            after = tuple((name, state.scalars[name][members[0]].item()) for name in names)
            for position in members:
                result[position] = (step, tuple(zip(names, previous)), after)
        return [result[position] for position in positions]

    def _expose_state(self, bucket: FlatBucket, position: int, initial: dict[str, float]) -> None:
        """Point ``self.state[param]`` at the views of one parameter's state, in torch's layout."""
        state = bucket.state
        entry: dict[str, Tensor] = {}
        if self.rule.step_in_state:
            entry["step"] = state.steps[position]
        entry.update(state.scalars_at(position))
        segment = bucket.segment_of(position)
        if segment is not None:
            entry.update({name: state.view(name, segment) for name in initial if name in state.tensors})
        if entry:
            self.state[bucket.params[position]] = entry

    def _step_per_parameter(self) -> None:
        """The groups outside buckets (``differentiable=True``): the rule's update per parameter."""
        for group in self.param_groups:
            if not self._per_parameter(group):
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(self.rule.sparse_error)
                step_parameter(self.rule, group, param, self.state[param], self._inverse_grad_scale())

    def _check_params(self) -> None:
        """Follow what users do to parameters after building the optimizer.

        A parameter re-pointed elsewhere with its dtype, device and shape unchanged
        (``vector_to_parameters``, ``p.data = ...``) is copied back into its bucket. A group whose
        parameters changed dtype, device or shape (``model.double()``, ``.to(...)``) is packed anew
        when it has no state yet, as torch.optim would just train on; once it has state this raises,
        naming the parameter, as torch's step fails on the mismatched state.
        """
        changed_groups = set()
        for bucket in self._buckets:
            layout = bucket.layout
            for position in bucket.moved_params():
                param, slot = bucket.params[position], layout.slots[position]
                if (param.dtype, param.device, tuple(param.shape)) == (layout.dtype, layout.device, slot.shape):
                    bucket.adopt_param(position)
                    continue
                if any(self._buckets[i].state.steps.any() for i in self._group_buckets(layout.group)):
                    raise RuntimeError(
                        f"{self._param_name(layout.group, param)} changed from {layout.dtype} on {layout.device}, "
                        f"shape {slot.shape}, to {param.dtype} on {param.device}, shape {tuple(param.shape)}, after "
                        f"the optimizer created its state. Convert the model before building the optimizer, or "
                        f"build a new optimizer and load the old one's state_dict() into it."
                    )
                changed_groups.add(layout.group)
        for group in sorted(changed_groups):
            self._replan_group(group)

    def _group_buckets(self, group: int) -> list[int]:
        return [i for i, bucket in enumerate(self._buckets) if bucket.layout.group == group]

    def _replan_group(self, group: int) -> None:
        """Pack a group anew from its parameters as they are now (only before it has state)."""
        indices = self._group_buckets(group)
        members = sorted(
            ((slot.index, param) for i in indices
             for param, slot in zip(self._buckets[i].params, self._buckets[i].layout.slots)),
            key=lambda member: member[0],
        )
        by_index = dict(members)
        layouts = self._plan_buckets([ParamSpec.of(param, i, group) for i, param in members])
        for layout in layouts:  # before the old buckets go
            self._bucket_state_dtype(layout.dtype, lambda: self._param_name(group, by_index[layout.slots[0].index]))
        for i in reversed(indices):
            del self._buckets[i]
        self._buckets[indices[0] : indices[0]] = [
            self._make_bucket(layout, [by_index[slot.index] for slot in layout.slots]) for layout in layouts
        ]
        self._sync.buckets_changed()

    @torch.no_grad()
    def gather_params(self) -> None:
        """Refresh every rank's full parameters from every rank's own shard of them.

        ``step()`` does this itself; call it after changing shards some other way (an EMA swapped in,
        a shard loaded). Collective when sharded; nothing to do otherwise.
        """
        pending = [
            self._comm.launch_gather(b.flat_param, b.shard_param, bounds=b.layout.bounds, label=f"gather_params: bucket {i}")
            for i, b in enumerate(self._buckets) if b.is_sharded
        ]
        for work in pending:
            work.wait()

    # -- gradients ------------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also ends the step's gradient bookkeeping (averages in flight, clipping)."""
        self._sync.end_step()
        super().zero_grad(set_to_none)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without communicating: backward passes inside launch no average.

        The next backward outside (with ``overlap_grad_reduce``) or ``step()`` averages the sum once.
        Under DDP, use ``model.no_sync()`` with ``reduce_grads=False`` instead: DDP averages.
        """
        with self._sync.no_sync():
            yield

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip the gradients of all this optimizer's parameters by their global norm; return that norm.

        Equal (within float rounding) to ``torch.nn.utils.clip_grad_norm_`` over all the parameters of
        the unsharded model, including ``norm_type=inf``; ``norm_type`` must be positive or inf. Call it
        between ``backward()`` and ``step()``.

        Sharded, this is a collective call: it averages the gradients now (``step()`` then does not
        again), each rank takes the norm of its own shards, one reduction of a scalar combines them,
        and each rank scales its own shard of the gradient, which is what ``step()`` uses; the rest of
        ``.grad`` is neither averaged nor scaled. ``zero_grad()`` discards the prepared gradients.
        """
        ready = self._sync.collect()
        for _ in self._sync.averaged(ready):
            pass
        sharded, whole = [], []
        for bucket, positions in zip(self._buckets, ready):
            if not positions:
                continue
            if bucket.is_sharded:
                sharded.append(bucket.shard_grad)
            elif all(bucket.grad_in_buffer(p) for p in positions):
                bucket.zero_grads_except(positions)
                whole.append(bucket.shard_grad)
            else:
                whole.extend(bucket.params[p].grad for p in positions)
        self._prepare_unbucketed_grads()
        whole.extend(self._unbucketed_grads())
        return clip_grad_norm(
            sharded, whole, self._comm, max_norm=max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
        )

    def _state_in_buckets(self) -> set[int]:
        """``id`` of every parameter whose optimizer state lives in a bucket (none without a rule:
        LBFGS packs its parameters but keeps torch's per-parameter state)."""
        if self.rule is None:
            return set()
        return {id(p) for bucket in self._buckets if not self._whole(bucket) for p in bucket.params}

    def _not_kept_here(self) -> set[int]:
        """``id`` of the parameters whose per-parameter state this rank does not keep: under a matrix
        algorithm's whole-tensor partitions, those another rank owns (none otherwise)."""
        if self._shards == 1:
            return set()
        return {id(p) for bucket in self._buckets if self._whole(bucket) for position, p in enumerate(bucket.params)
                if bucket.segment_of(position) is None}

    def _unbucketed_grads(self) -> list[Tensor]:
        """Gradients of the parameters that live outside buckets (per-parameter groups)."""
        bucketed = {id(p) for bucket in self._buckets for p in bucket.params}
        return [
            p.grad for group in self.param_groups for p in group["params"]
            if id(p) not in bucketed and p.grad is not None
        ]

    def _prepare_unbucketed_grads(self) -> None:
        """Before clipping: bring unbucketed gradients to what ``step()`` will use (replicated ones averaged)."""

    # -- state dicts ----------------------------------------------------------------------------

    def state_dict(self, *, rank0_only: bool = False) -> dict[str, Any]:
        """torch's state dict: ``{"state": {index: {name: tensor shaped like the param}}, "param_groups": ...}``.

        Sharded, this is a collective call that gathers the full state: one collective per (bucket,
        state name), no pickling. By default every rank receives the full state dict; with
        ``rank0_only=True`` only group rank 0 does and every other rank gets ``{}``. Unsharded (or
        replicated), every rank already holds the full state and returns it; ``rank0_only`` is ignored.

        State tensors are views of one flat tensor per (bucket, state name): save the dict whole (as
        ``torch.save`` does), and copy what you extract from it.
        """
        if self._shards == 1:
            return super().state_dict()
        sharded = [bucket for bucket in self._buckets if bucket.is_sharded]
        dst = 0 if rank0_only else None
        whole = [bucket for bucket in sharded if self._whole(bucket)]
        full = gather_full_state([b for b in sharded if not self._whole(b)], self.state, self._comm, dst=dst)
        if whole:
            full.update(gather_owned_state(whole, self.state, self._comm, self.tensor_rule, dst=dst))
        if rank0_only and self._comm.rank != 0:
            return {}
        bucketed = {id(p) for bucket in sharded for p in bucket.params}
        merged = defaultdict(dict, full)
        merged.update({p: entry for p, entry in self.state.items() if id(p) not in bucketed})
        own, self.state = self.state, merged
        try:
            return super().state_dict()
        finally:
            self.state = own

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a torch-format state dict (from shardoptim or torch.optim) into the flat buckets.

        Everything is checked before anything changes: a state dict with another number of groups,
        other group sizes, state tensors of the wrong size or invalid hyper-parameters raises
        ``ValueError`` and leaves the optimizer as it was. The state dict may be this optimizer's own
        (its tensors views of the buckets, as DCP's in-place load leaves them): nothing is lost.
        """
        state_dict = state_dict.copy()
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
            merged = merged_group(group, saved)
            self._check_group(merged)
            merged_groups.append(merged)
        bucketed = self._state_in_buckets()
        apply_buckets = load_bucketed_state(self, merged_groups, saved_groups, saved_state, bucketed)
        per_parameter = load_per_parameter_state(merged_groups, saved_groups, saved_state,
                                                 bucketed | self._not_kept_here())
        if self.tensor_rule is not None:  # a number where torch keeps a 0-D tensor (an old state dict's step)
            for entry in per_parameter.values():
                for name in self.tensor_rule.scalar_names:
                    if name in entry and not isinstance(entry[name], Tensor):
                        entry[name] = torch.tensor(float(entry[name]), dtype=scalar_dtype())
        for group, merged in zip(self.param_groups, merged_groups):
            group.clear()
            group.update(merged)
        self.state = defaultdict(dict, per_parameter)
        apply_buckets()
        self._expose_initial_state()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def shard_state_dict(self) -> dict[str, Any]:
        """This rank's own part of the optimizer state, without a collective and without copies.

        ``{"algorithm", "rank", "world_size", "param_groups", "buckets", "per_parameter"}``: the groups
        in torch's packed format (hyper-parameters, parameter indices, ``param_names`` when given);
        per bucket its ``layout`` (``BucketLayout.to_dict()``: the parameter table with shapes, dtype,
        offsets, padding and every rank's range), ``steps`` and ``scalars`` (one number per slot),
        and ``state``: this rank's shard of each state tensor, a view of the live buffer; and the
        torch-format state of parameters outside buckets. Everything but the tensors is JSON data.
        ``load_shard_state_dict`` puts it back on the same layout;
        :func:`shardoptim.core.reshard.plan_copies` maps it onto another world size.
        """
        return shard_state(self)

    def load_shard_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``shard_state_dict()``'s output on the same layout and rank; values are copied.

        Everything is checked first (algorithm, rank and world size, layouts, tensor sizes,
        hyper-parameters): a mismatch raises ``ValueError`` and changes nothing.
        """
        read_shard_state(self, state)

    def memory_report(self) -> MemoryReport:
        """Per rank, the bytes of parameters, gradients, optimizer state and padding (no collective)."""
        return memory_report(
            self._buckets, self._shards, [self.tensor_rule if self._whole(b) else None for b in self._buckets]
        )

    # -- copies ---------------------------------------------------------------------------------

    def _portable_state(self) -> dict[str, Any]:
        return {
            "defaults": self.defaults,
            "param_groups": self.param_groups,
            "reduce_grads": self.reduce_grads,
            "sharding": self.sharding,
            "state_dtype": self.state_dtype,
            "process_group": self._process_group,
            "shard_state": self.shard_state_dict(),
        }

    @property
    def _process_group(self) -> Any:
        return getattr(self._comm, "group", None)

    def __getstate__(self) -> dict[str, Any]:
        if self._process_group is not None:
            raise TypeError(
                f"a sharded {type(self).__name__} cannot be pickled: its process group belongs to this "
                f"process. Save state_dict() or shard_state_dict(), or use shardoptim.checkpoint."
            )
        return self._portable_state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "shard_state" not in state:  # a plain torch.optim pickle
            super().__setstate__(state)
            return
        groups = [dict(group) for group in state["param_groups"]]
        Optimizer.__init__(
            self, groups, state["defaults"], process_group=state["process_group"],
            reduce_grads=state["reduce_grads"], sharding=state["sharding"], state_dtype=state.get("state_dtype"),
        )
        read_shard_state(self, state["shard_state"])

    def __deepcopy__(self, memo: dict[int, Any]) -> Optimizer:
        group = self._process_group
        if group is not None:
            memo[id(group)] = group  # the copy works with the same ranks
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self._portable_state(), memo))
        return copied

    def __copy__(self) -> Optimizer:
        copied = type(self).__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __repr__(self) -> str:
        name = type(self).__name__
        elements = sum(bucket.layout.numel for bucket in self._buckets)
        summary = f"{len(self._buckets)} flat buckets, {elements} elements, world size {self._comm.world_size}"
        return f"{name} [{summary}]" + super().__repr__().removeprefix(name)


def _comm_for(process_group: Any, config: ShardingConfig) -> Comm:
    """The ``Comm`` for ``process_group``; a group of one (or none) is the local world."""
    if process_group is None:
        return LocalComm()
    import torch.distributed as dist

    from .distributed import ProcessGroupComm

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) == 1:
        return LocalComm()
    return ProcessGroupComm(process_group, config)


def _rounds(positions: list[int], repeats: dict[int, int]) -> Iterator[list[int]]:
    """The positions to update, then again those listed more than once in their group, per extra listing."""
    yield positions
    if not repeats:
        return
    for round_ in range(1, 1 + max((repeats.get(p, 0) for p in positions), default=0)):
        yield [p for p in positions if repeats.get(p, 0) >= round_]
