"""An optimizer's state in and out: torch's per-parameter format, and this rank's own shards.

Loading checks everything before anything changes, and never loses a value when the source aliases
the destination: a state dict returned by ``state_dict()`` holds views of the very buffers it is
loaded into (so does DCP's in-place load of one), so sources are resolved first (in place, or
copied out when they overlap other buffers) and only then are buffers reset and filled.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .layout import Segment
from .master import MASTER
from .rule import HyperParams

if TYPE_CHECKING:
    from .bucket import FlatBucket
    from .optimizer import Optimizer


def pack_groups(param_groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The groups as torch's ``state_dict()`` packs them: hyper-parameters, and ``params`` as indices
    (a parameter listed twice keeps its first index; every listing advances the count)."""
    indices: dict[int, int] = {}
    start = 0
    packed = []
    for group in param_groups:
        for i, param in enumerate(group["params"], start):
            indices.setdefault(id(param), i)
        entry = {key: value for key, value in group.items() if key != "params"}
        entry["params"] = [indices[id(param)] for param in group["params"]]
        start += len(group["params"])
        packed.append(entry)
    return packed


def index_of_params(param_groups: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """``id(param) -> index`` as ``pack_groups`` numbers them."""
    return {
        id(param): index
        for group, packed in zip(param_groups, pack_groups(param_groups))
        for param, index in zip(group["params"], packed["params"])
    }


def merged_group(group: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """A live param group with a saved one's hyper-parameters (copied); the live group's parameters,
    and its values for whatever the saved group lacks (a state dict of an older torch misses flags
    added since: ``maximize``, ``foreach``, ...)."""
    merged = {**group, **copy.deepcopy({key: value for key, value in saved.items() if key != "params"})}
    merged["params"] = group["params"]
    return merged


def cast_like(param: Tensor, value: Any, key: Any = None) -> Any:
    """torch's rule for loaded state: tensors (also inside lists and dicts) moved to ``param``'s device,
    and to its dtype when ``param`` is real floating point; ``step`` keeps its dtype."""
    if isinstance(value, Tensor):
        if key == "step" or not param.is_floating_point():
            return value.to(param.device) if key != "step" else value
        return value.to(dtype=param.dtype, device=param.device)
    if isinstance(value, dict):
        return {k: cast_like(param, item, k) for k, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cast_like(param, item) for item in value)
    return value


def load_per_parameter_state(
    groups: Sequence[Mapping[str, Any]], saved_groups: Sequence[Mapping[str, Any]],
    saved_state: Mapping[Any, Any], skip: set[int],
) -> dict[Tensor, dict[str, Any]]:
    """The torch-format state of the parameters that keep it here (all but the ``id``s ``skip``: state
    in buckets, or kept by another rank), cast as torch casts it."""
    state: dict[Tensor, dict[str, Any]] = {}
    for group, saved in zip(groups, saved_groups):
        for param, index in zip(group["params"], saved["params"]):
            if id(param) not in skip and index in saved_state:
                state[param] = cast_like(param, saved_state[index])
    return state


def _number(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _checked_entry(
    entry: Mapping[str, Any], param: Tensor, initial: Mapping[str, float], scalar_keys: set[str], index: Any
) -> Mapping[str, Any]:
    """One parameter's saved state, checked against the parameter it is about to fill."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"state of parameter {index} must be a dict, got {type(entry).__name__}")
    for name, value in entry.items():
        if name in scalar_keys:
            if not (isinstance(value, (int, float)) or isinstance(value, Tensor) and value.numel() == 1):
                raise ValueError(f"state {name!r} of parameter {index} must be a number or a one-element tensor")
            continue
        if name not in initial and name != MASTER:  # a master is loaded where kept, ignored elsewhere
            raise ValueError(f"state of parameter {index} has an entry {name!r} this optimizer does not keep")
        if not isinstance(value, Tensor) or value.numel() != param.numel():
            size = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"state {name!r} of parameter {index} has size {size}, the parameter {tuple(param.shape)}"
            )
    return entry


def _storages(buckets: Iterable[FlatBucket]) -> set[int]:
    return {t.untyped_storage().data_ptr() for bucket in buckets for t in bucket.state.tensors.values()}


def _source(bucket: FlatBucket, segment: Segment, name: str, value: Tensor, ours: set[int]) -> Tensor | None:
    """The part of a saved state tensor that fills ``segment``: None when it already is that part of the
    buffer, a copy when it overlaps some other part of the buffers, else a view of ``value``."""
    dense = value.to_dense() if value.is_sparse else value
    source = dense.reshape(-1)[segment.param_start : segment.param_start + segment.numel]
    target = bucket.state.tensors.get(name)
    if target is not None and source.dtype == target.dtype and source.device == target.device and (
        source.data_ptr() == target[segment.start : segment.stop].data_ptr()
    ):
        return None
    if source.untyped_storage().data_ptr() in ours:
        return source.clone()
    return source


def load_bucketed_state(
    opt: Optimizer, groups: Sequence[Mapping[str, Any]], saved_groups: Sequence[Mapping[str, Any]],
    saved_state: Mapping[Any, Any], bucketed: set[int],
) -> Callable[[], None]:
    """Check a torch-format state dict against the buckets; return the function that loads it.

    Call the returned function once the groups hold their new hyper-parameters. Sources that are
    already where they belong (this optimizer's own views) are not copied; sources overlapping other
    parts of the buffers are copied out now, before anything is written.
    """
    rule = opt.rule
    if rule is None:
        return lambda: None
    owner = {id(p): (bucket, position) for bucket in opt.buckets for position, p in enumerate(bucket.params)}
    saved: dict[tuple[int, int], Mapping[str, Any]] = {}
    for group, saved_group in zip(groups, saved_groups):
        h = HyperParams.of(group)
        scalar_keys = {"step", *(rule.scalar_state(h, 0) if rule.scalar_state else ())}
        for param, index in zip(group["params"], saved_group["params"]):
            if id(param) in bucketed and index in saved_state:
                bucket, position = owner[id(param)]
                initial = opt._bucket_rule(bucket).state(h)
                saved[id(bucket), position] = _checked_entry(saved_state[index], param, initial, scalar_keys, index)

    ours = _storages(opt.buckets)
    sources: dict[tuple[int, int, str], Tensor | None] = {}  # None: already in place
    elementwise = [bucket for bucket in opt.buckets if not opt._whole(bucket)]  # (a matrix group's state is per parameter)
    for bucket in elementwise:
        tensor_names = set(opt._bucket_rule(bucket).state(HyperParams.of(groups[bucket.layout.group])))
        for position in range(len(bucket.params)):
            entry, segment = saved.get((id(bucket), position)), bucket.segment_of(position)
            if entry is None or segment is None:
                continue
            for name, value in entry.items():
                if name in tensor_names:
                    sources[id(bucket), position, name] = _source(bucket, segment, name, value, ours)

    def apply() -> None:
        for bucket in elementwise:
            h = HyperParams.of(opt.param_groups[bucket.layout.group])
            initial = opt._bucket_rule(bucket).state(h)
            loaded = [position for position in range(len(bucket.params)) if (id(bucket), position) in saved]
            if loaded or bucket.state.tensors:
                bucket.state.allocate(initial)
            derived_names = rule.scalar_state(h, 0) if rule.scalar_state else {}
            for position in range(len(bucket.params)):
                entry = saved.get((id(bucket), position))
                segment = bucket.segment_of(position)
                if entry is None:
                    bucket.state.steps[position] = 0
                    if bucket.state.tensors:
                        bucket.state.reset(segment, {n: v for n, v in initial.items() if n in bucket.state.tensors})
                    continue
                steps = int(_number(entry["step"])) if "step" in entry else 1
                bucket.state.steps[position] = steps
                if derived_names:
                    derived = rule.scalar_state(h, steps)
                    bucket.state.set_scalars(
                        [position], {name: _number(entry.get(name, derived[name])) for name in derived_names}
                    )
                missing = {name: value for name, value in initial.items() if name not in entry}
                bucket.state.reset(segment, missing)
                for name in initial:
                    source = sources.get((id(bucket), position, name))
                    if source is not None:
                        bucket.state.tensors[name][segment.start : segment.stop].copy_(source)
            for position in loaded:
                opt._expose_state(bucket, position, initial)

    return apply


def shard_state(opt: Optimizer) -> dict[str, Any]:
    """``Optimizer.shard_state_dict()``: see there."""
    bucketed = opt._state_in_buckets()
    indices = index_of_params(opt.param_groups)
    return {
        "algorithm": type(opt).__name__,
        "rank": opt._comm.rank,
        "world_size": opt._comm.world_size,
        "param_groups": pack_groups(opt.param_groups),
        "buckets": [
            {
                "layout": bucket.layout.to_dict(),
                "steps": [int(step) for step in bucket.state.steps.tolist()],
                "scalars": {name: values.tolist() for name, values in bucket.state.scalars.items()},
                "state": dict(bucket.state.tensors),
            }
            for bucket in opt.buckets
        ],
        "per_parameter": {
            indices[id(param)]: entry for param, entry in opt.state.items() if id(param) not in bucketed and entry
        },
    }


def read_shard_state(opt: Optimizer, state: Mapping[str, Any]) -> None:
    """``Optimizer.load_shard_state_dict()``: see there."""
    check_shard_state(opt, state)()


def check_shard_state(opt: Optimizer, state: Mapping[str, Any]) -> Callable[[], None]:
    """Check a shard state against ``opt`` (raising what loading it would); return what loads it."""
    name = type(opt).__name__
    if state.get("algorithm") != name:
        raise ValueError(f"shard state of {state.get('algorithm')!r} cannot be loaded into {name}")
    world, rank = opt._comm.world_size, opt._comm.rank
    if (state.get("world_size"), state.get("rank")) != (world, rank):
        raise ValueError(
            f"shard state of rank {state.get('rank')} of {state.get('world_size')} cannot be loaded on rank "
            f"{rank} of {world}: reshard it (shardoptim.core.reshard) or load a full state_dict()"
        )
    buckets = state["buckets"]
    if len(buckets) != len(opt.buckets):
        raise ValueError(f"shard state has {len(buckets)} buckets, this optimizer {len(opt.buckets)}")
    for position, (saved, bucket) in enumerate(zip(buckets, opt.buckets)):
        if saved["layout"] != bucket.layout.to_dict():
            raise ValueError(f"bucket {position} of the shard state has another layout than this optimizer's")
        if len(saved["steps"]) != len(bucket.params):
            raise ValueError(f"bucket {position} of the shard state has {len(saved['steps'])} step counts")
        for tensor_name, tensor in saved["state"].items():
            if not isinstance(tensor, Tensor) or tensor.numel() != bucket.state.numel:
                raise ValueError(
                    f"state {tensor_name!r} of bucket {position} must be a tensor of {bucket.state.numel} elements"
                )
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(opt.param_groups) or any(
        len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, opt.param_groups)
    ):
        raise ValueError("shard state's param groups do not match this optimizer's")
    merged = []
    for group, saved in zip(opt.param_groups, saved_groups):
        candidate = merged_group(group, saved)
        opt._check_group(candidate)
        merged.append(candidate)
    per_parameter = load_per_parameter_state(
        merged, saved_groups, state.get("per_parameter", {}), opt._state_in_buckets() | opt._not_kept_here()
    )

    def apply() -> None:
        for group, candidate in zip(opt.param_groups, merged):
            group.clear()
            group.update(candidate)
        opt.state.clear()
        opt.state.update(per_parameter)
        for saved, bucket in zip(buckets, opt.buckets):
            for tensor_name, tensor in saved["state"].items():
                if tensor_name == MASTER and not bucket.state.keeps_master:
                    continue  # saved with a state_dtype this optimizer lacks: the parameters alone count
                bucket.state.allocate({tensor_name: 0.0})
                bucket.state.tensors[tensor_name].copy_(tensor.reshape(-1))
            if bucket.state.keeps_master and MASTER not in saved["state"]:
                # Saved without one: the next step starts it from the parameters as they are then
                # (a checkpoint restores them after the state).
                bucket.state.tensors.pop(MASTER, None)
            dtype = bucket.state.steps.dtype
            bucket.state.steps.copy_(torch.tensor(saved["steps"], dtype=dtype))
            bucket.state.scalars = {key: torch.tensor(values, dtype=dtype) for key, values in saved["scalars"].items()}
            if opt.rule is not None and not opt._whole(bucket):
                initial = opt._bucket_rule(bucket).state(HyperParams.of(opt.param_groups[bucket.layout.group]))
                for position, steps in enumerate(saved["steps"]):
                    if steps > 0:
                        opt._expose_state(bucket, position, initial)
        opt._expose_initial_state()

    return apply
