"""What one rank contributes to a checkpoint: the tensors of its file, the shared tensors, JSON data.

Nothing is gathered: each rank takes its own shards of every sharded bucket (the optimizer's state
tensors, its flat parameters, a ``ShardedEMA``'s averages) from the optimizer's
``shard_state_dict()``; tensors every rank holds whole (buckets of a replicated optimizer,
per-parameter state, the model's buffers and parameters outside the optimizer, an
``AveragedModel``) are taken by rank 0 alone. Tensors are the live ones (views, no copies) until
``staging.BackgroundCopy`` copies them for a save that runs in the background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Optimizer
from ..core.state_dicts import index_of_params, pack_groups
from ..ema import AveragedModel, ShardedEMA
from ..sched.state import to_plain
from .manifest import rng_key, state_key
from .rng import capture_rng

#: The marker of a tensor inside JSON data (per-parameter optimizer state): the key of the tensor.
TENSOR = "$tensor"


@dataclass
class Snapshot:
    """One rank's part of a save: ``shard`` goes to its file, ``shared`` (rank 0 only) to the shared
    file, ``manifest`` (rank 0's is used), ``rng`` (this rank's) and ``owned_state`` (the per-parameter
    optimizer state of the parameters this rank owns whole, a matrix algorithm's, sharded) to the
    manifest. ``stepped`` names the tensors of ``shard`` that only a shardoptim optimizer's ``step()``
    (or a load into it) writes to."""

    rank: int
    world_size: int
    shard: dict[str, Tensor] = field(default_factory=dict)
    shared: dict[str, Tensor] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    owned_state: dict[str, Any] = field(default_factory=dict)
    stepped: set[str] = field(default_factory=set)


def storable(tensor: Tensor) -> Tensor:
    """A tensor as a checkpoint file holds it: complex ones as their real view (pairs of reals)."""
    tensor = tensor.detach()
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def capture(
    *,
    rank: int,
    world_size: int,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    schedulers: Sequence[Any],
    ema: ShardedEMA | AveragedModel | None,
    extra: Any,
) -> Snapshot:
    """Everything ``save`` writes for this rank, as live tensors and JSON data."""
    snapshot = Snapshot(rank, world_size)
    flat_params: dict[int, int] = {}  # id(param) -> index, for parameters saved in the buckets
    if optimizer is not None:
        flat_params = _capture_optimizer(snapshot, optimizer)
    if model is not None:
        snapshot.manifest["model"] = _capture_model(snapshot, model, flat_params)
    snapshot.manifest["params"] = _param_table(optimizer, model)
    snapshot.manifest["schedulers"] = [to_plain(scheduler.state_dict()) for scheduler in schedulers]
    if ema is not None:
        snapshot.manifest["ema"] = _capture_ema(snapshot, ema)
    snapshot.manifest["extra"] = extra
    tensors, snapshot.rng = capture_rng()
    snapshot.shard.update({rng_key(rank, name): state for name, state in tensors.items()})
    return snapshot


def _writes(layout_world: int, rank: int) -> bool:
    """Whether this rank writes its range of a bucket: every rank of a sharded one, rank 0 of a whole one."""
    return layout_world > 1 or rank == 0


def _capture_optimizer(snapshot: Snapshot, optimizer: torch.optim.Optimizer) -> dict[int, int]:
    rank = snapshot.rank
    if not isinstance(optimizer, Optimizer):  # a torch.optim optimizer: its own per-parameter state
        state = optimizer.state_dict()
        snapshot.manifest["optimizer"] = {
            "algorithm": type(optimizer).__name__, "torch": True, "param_groups": to_plain(state["param_groups"]),
            "buckets": [], "per_parameter": _tensors_out(snapshot, state["state"], "perparam") if rank == 0 else {},
        }
        return {}
    state = optimizer.shard_state_dict()
    before = set(snapshot.shard)
    buckets = []
    for position, (bucket, saved) in enumerate(zip(optimizer.buckets, state["buckets"])):
        if _writes(bucket.layout.world_size, rank):
            for name, tensor in saved["state"].items():
                snapshot.shard[state_key(rank, position, name)] = storable(tensor)
            snapshot.shard[state_key(rank, position, "param")] = storable(bucket.shard_param)
        buckets.append({
            "layout": saved["layout"], "steps": saved["steps"], "scalars": saved["scalars"],
            "names": list(saved["state"]),
        })
    if _owned_whole(optimizer):  # each rank holds the state of the parameters it owns: in its own file
        snapshot.owned_state = _tensors_out(snapshot, state["per_parameter"], f"r{rank}.perparam", rank=rank)
        per_parameter = {}
    else:
        per_parameter = _tensors_out(snapshot, state["per_parameter"], "perparam") if rank == 0 else {}
    snapshot.stepped = set(snapshot.shard) - before
    snapshot.manifest["optimizer"] = {
        "algorithm": state["algorithm"], "torch": False, "param_groups": to_plain(state["param_groups"]),
        "buckets": buckets, "per_parameter": per_parameter,
        # how the buckets were planned, so tools can plan them for another world size
        "bucket_cap_numel": optimizer.sharding.bucket_cap_numel, "shardable": type(optimizer).shardable,
    }
    indices = index_of_params(optimizer.param_groups)
    return {id(p): indices[id(p)] for bucket in optimizer.buckets for p in bucket.params}


def _owned_whole(optimizer: Optimizer) -> bool:
    """Whether the optimizer's per-parameter state is split by owner (a matrix algorithm, sharded)."""
    return any(bucket.is_sharded and optimizer.owns_whole_tensors(optimizer.param_groups[bucket.layout.group])
               for bucket in optimizer.buckets)


def _tensors_out(snapshot: Snapshot, value: Any, key: str, *, rank: int | None = None) -> Any:
    """``value`` as JSON data, its tensors moved into the shared file (each replaced by its key), or
    into rank ``rank``'s file (the key then records the rank too)."""
    if isinstance(value, Tensor):
        if rank is None:
            snapshot.shared[key] = storable(value)
            return {TENSOR: key, "complex": value.is_complex()}
        snapshot.shard[key] = storable(value)
        return {TENSOR: key, "complex": value.is_complex(), "rank": rank}
    if isinstance(value, Mapping):
        return {str(k): _tensors_out(snapshot, v, f"{key}.{k}", rank=rank) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors_out(snapshot, v, f"{key}.{i}", rank=rank) for i, v in enumerate(value)]
    return value


def _capture_model(snapshot: Snapshot, model: nn.Module, flat_params: dict[int, int]) -> dict[str, Any]:
    """Each ``state_dict()`` key of ``model``: a parameter the optimizer's buckets hold (saved with
    them), the same tensor as an earlier key (tied weights), or a tensor of the shared file."""
    entries: dict[str, Any] = {}
    first_key: dict[int, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in flat_params:
            entries[key] = {"param": flat_params[id(tensor)]}
        elif id(tensor) in first_key:
            entries[key] = {"same_as": first_key[id(tensor)]}
        else:
            first_key[id(tensor)] = key
            entries[key] = {"tensor": f"model.{key}", "complex": tensor.is_complex()}
            if snapshot.rank == 0:
                snapshot.shared[f"model.{key}"] = storable(tensor)
    return {"entries": entries}


def _param_table(optimizer: torch.optim.Optimizer | None, model: nn.Module | None) -> list[dict[str, Any]]:
    """The optimizer's parameters in torch's index order, named from ``param_names`` or the model."""
    if optimizer is None:
        return []
    names_from_model = {}
    if model is not None:
        for key, tensor in model.state_dict(keep_vars=True).items():
            names_from_model.setdefault(id(tensor), key)
    table, seen = [], set()
    for group_index, (group, packed) in enumerate(zip(optimizer.param_groups, pack_groups(optimizer.param_groups))):
        names = group.get("param_names")
        for position, (param, index) in enumerate(zip(group["params"], packed["params"])):
            if index in seen:
                continue
            seen.add(index)
            name = names[position] if names is not None else names_from_model.get(id(param))
            table.append({
                "index": index, "group": group_index, "name": name, "shape": list(param.shape),
                "dtype": str(param.dtype).removeprefix("torch."),
            })
    return table


def _capture_ema(snapshot: Snapshot, ema: Any) -> dict[str, Any]:
    if isinstance(ema, ShardedEMA):
        state = ema.state_dict()
        buckets = ema.optimizer.buckets
        for position, (bucket, shard) in enumerate(zip(buckets, state["shards"])):
            if _writes(bucket.layout.world_size, snapshot.rank):
                snapshot.shard[state_key(snapshot.rank, position, "ema")] = storable(shard)
        return {"kind": "sharded", "decay": state["decay"], "warmup": state["warmup"],
                "num_updates": state["num_updates"]}
    if isinstance(ema, (AveragedModel, torch.optim.swa_utils.AveragedModel)):
        keys = []
        for key, tensor in ema.state_dict().items():
            keys.append(key)
            if snapshot.rank == 0:
                snapshot.shared[f"ema.{key}"] = storable(tensor)
        return {"kind": "averaged_model", "keys": keys}
    raise TypeError(f"ema must be a ShardedEMA or an AveragedModel, got {type(ema).__name__}")
