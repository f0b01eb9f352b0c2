"""``load``: read and check everything first, then put it in place.

Each rank reads only what it will hold: its part of every bucket of the optimizer as it is built now,
at any world size, as ranged reads of the saved shards (``shardoptim.core.reshard.plan_copies``),
and the tensors every rank holds whole. Everything is read into fresh tensors and checked (the
parameter table against the optimizer's, the model's keys, every byte against its CRC) before
anything live changes; the ranks agree that all of them succeeded, and only then is the state
applied: a failed load leaves the model, optimizer, schedulers and EMA as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core import Optimizer, plan_copies
from ..core.shard_state import initial_fill
from ..core.state_dicts import check_shard_state, index_of_params
from ..ema import AveragedModel, ShardedEMA
from ..sched.state import like
from .arguments import check_components
from .capture import _param_table
from .errors import CheckpointError, CheckpointFormatError
from .reader import Checkpoint, layouts, open_checkpoint
from .rng import check_rng, restore_rng
from .writer import agree, comm_of
from .writer import wait as wait_for_saves


def load(
    url: str,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    schedulers: Sequence[Any] = (),
    ema: ShardedEMA | AveragedModel | None = None,
    strict: bool = True,
    storage_options: dict[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> Any:
    """Restore what ``save`` wrote at ``url`` into the objects given; return the saved ``extra``.

    Collective over the same ranks as ``save`` (call it on every rank), at any world size: each rank
    reads its own part. The optimizer, model and EMA must be built as they were saved
    (same parameters in the same order; checked, naming the first difference). ``strict``: the
    model's ``state_dict()`` keys and the number of schedulers must match the checkpoint's exactly;
    otherwise what matches is loaded and the rest left. Nothing changes unless everything could be
    read and checked on every rank.
    """
    check_components(model, optimizer, schedulers, ema)
    wait_for_saves()
    comm = comm_of(optimizer, process_group)
    steps: list[Callable[[], None]] = []
    error: BaseException | None = None
    try:
        checkpoint = open_checkpoint(url, storage_options)
        if optimizer is not None:
            steps += _stage_optimizer(checkpoint, optimizer, model)
        if model is not None:
            steps += _stage_model(checkpoint, model, optimizer, strict)
        steps += _stage_schedulers(checkpoint, schedulers, strict)
        if ema is not None:
            steps += _stage_ema(checkpoint, ema)
        steps += _stage_rng(checkpoint, comm.rank)
    except BaseException as caught:  # noqa: BLE001 - every rank learns that a rank failed
        error = caught
    failed = agree(comm, int(error is not None), "sum")
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"{url}: {failed} other rank(s) could not read their part of the checkpoint")
    for apply in steps:
        apply()
    return checkpoint.manifest.extra


# -- the optimizer ----------------------------------------------------------------------------------


def check_parameters(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, model: nn.Module | None) -> None:
    """Refuse an optimizer whose parameters differ from the saved ones (count, shapes, dtypes, groups,
    names where both sides know them), naming the first difference."""
    saved, mine = checkpoint.manifest.params, _param_table(optimizer, model)
    if len(saved) != len(mine):
        raise CheckpointError(
            f"{checkpoint.url}: the checkpoint's optimizer has {len(saved)} parameters, this one {len(mine)}"
        )
    for old, new in zip(saved, mine):
        where = f"parameter {new['index']}" + (f" ({new['name']!r})" if new["name"] else "")
        for field in ("shape", "dtype", "group"):
            if old[field] != new[field]:
                raise CheckpointError(
                    f"{checkpoint.url}: {where} has {field} {new[field]}, the checkpoint's {old[field]}: this model "
                    f"or optimizer is not the one that was saved"
                )
        if old.get("name") and new["name"] and old["name"] != new["name"]:
            raise CheckpointError(f"{checkpoint.url}: {where} was saved as {old['name']!r}")


def _stage_optimizer(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, model: nn.Module | None) -> list:
    saved = checkpoint.manifest.optimizer
    if saved is None:
        raise CheckpointError(f"{checkpoint.url}: the checkpoint holds no optimizer")
    if not _same_family(saved["algorithm"], optimizer):
        raise CheckpointError(
            f"{checkpoint.url}: a checkpoint of {saved['algorithm']} cannot be loaded into {type(optimizer).__name__}"
        )
    check_parameters(checkpoint, optimizer, model)
    if not isinstance(optimizer, Optimizer) or saved.get("torch"):
        state = torch_format_state(checkpoint)
        _check_group_sizes(checkpoint, optimizer, state["param_groups"])
        return [lambda: optimizer.load_state_dict(state)]
    target = optimizer.shard_state_dict()
    target["param_groups"] = _saved_groups(checkpoint, optimizer, saved["param_groups"])
    elsewhere = optimizer._not_kept_here()
    kept = {index for index, param in _params_by_index(optimizer).items() if id(param) not in elsewhere}
    target["per_parameter"] = per_parameter_state(checkpoint, kept)
    rank = optimizer.comm.rank
    copies = _copies(checkpoint, optimizer, rank)
    params = _param_pieces(checkpoint, optimizer, rank) if model is not None else []
    for position, (bucket, target_bucket) in enumerate(zip(optimizer.buckets, target["buckets"])):
        indices = [slot.index for slot in bucket.layout.slots]
        target_bucket["steps"], target_bucket["scalars"] = _counts(checkpoint, indices)
        initial = optimizer.initial_bucket_state({**optimizer.param_groups[bucket.layout.group],
                                                  **target["param_groups"][bucket.layout.group]})
        mine = [copy_ for copy_ in copies if copy_.target_bucket == position]
        target_bucket["state"] = {
            name: _stage(checkpoint, [c for c in mine if name in checkpoint.buckets[c.source_bucket].names], name,
                         bucket.shard_param, bucket.state.dtype,  # wider than the parameters under state_dtype
                         initial_fill(initial.get(name, 0.0), bucket.shard_param.dtype))
            for name in _names_covering(checkpoint, bucket.layout)
        }
    try:
        apply_state = check_shard_state(optimizer, target)
    except (TypeError, KeyError, IndexError, AttributeError) as error:  # hyper-parameters of the wrong kind
        raise CheckpointFormatError(f"{checkpoint.url}: the saved optimizer state does not fit this optimizer: "
                                    f"{type(error).__name__}: {error}") from None

    def apply() -> None:
        apply_state()
        if model is not None:  # the parameters travel with the optimizer's buckets
            with torch.no_grad():
                for bucket, pieces in zip(optimizer.buckets, params):
                    for offset, values in pieces:
                        bucket.flat_param[offset : offset + values.numel()].copy_(values)
            if not checkpoint.storage.is_local:
                optimizer.gather_params()

    return [apply]


def per_parameter_state(checkpoint: Checkpoint, wanted: set[int] | None = None) -> dict[int, Any]:
    """The saved per-parameter optimizer state (torch's format), its tensors read from the file that
    holds them; only the parameters ``wanted`` (all by default), so a rank reads what it keeps."""
    raw = checkpoint.manifest.optimizer.get("per_parameter", {})
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k.isdigit() and isinstance(v, dict)
                                            for k, v in raw.items()):
        raise CheckpointFormatError(f"{checkpoint.url}: optimizer.per_parameter must map indices to objects")
    return {int(index): checkpoint.tensors_in(entry) for index, entry in raw.items()
            if wanted is None or int(index) in wanted}


def _params_by_index(optimizer: torch.optim.Optimizer) -> dict[int, Tensor]:
    """The optimizer's parameters by their state-dict index."""
    indices = index_of_params(optimizer.param_groups)
    return {indices[id(p)]: p for group in optimizer.param_groups for p in group["params"]}


def _same_family(saved: str, optimizer: torch.optim.Optimizer) -> bool:
    """``shardoptim.AdamW`` and ``torch.optim.AdamW`` read each other's checkpoints."""
    return any(cls.__name__ == saved for cls in type(optimizer).__mro__)


def _copies(checkpoint: Checkpoint, optimizer: Optimizer, rank: int) -> list:
    """The ranged reads that fill rank ``rank``'s part of every bucket (see ``_part``)."""
    mine = [bucket.layout for bucket in optimizer.buckets]
    if not mine:
        return []
    return plan_copies(layouts(checkpoint.buckets), mine, _part(optimizer, rank))


def _part(optimizer: Optimizer, rank: int) -> int:
    """The part of the buckets rank ``rank`` holds: its own, or, where the buckets are whole (an
    optimizer that cannot shard, under a process group), all of them, as rank 0."""
    return rank if optimizer.buckets and optimizer.buckets[0].is_sharded else 0


def _param_pieces(checkpoint: Checkpoint, optimizer: Optimizer, rank: int) -> list[list[tuple[int, Tensor]]]:
    """Per bucket, the checked saved parameters to copy into its ``flat_param``, as (offset, values).

    On local storage every rank reads all of them (views of the page cache: cheaper than the
    all-gather that would follow); elsewhere only its own part (``_copies``), then gathers.
    """
    pieces: list[list[tuple[int, Tensor]]] = [[] for _ in optimizer.buckets]
    parts = [_part(optimizer, rank)]
    if checkpoint.storage.is_local and optimizer.buckets:
        parts = range(optimizer.buckets[0].layout.world_size)
    for part in parts:
        for copy_ in _copies(checkpoint, optimizer, part):
            start = optimizer.buckets[copy_.target_bucket].layout.bounds[part][0]
            values = checkpoint.view_range(copy_.source_rank, copy_.source_bucket, "param", copy_.source_start,
                                           copy_.source_start + copy_.numel)
            pieces[copy_.target_bucket].append((start + copy_.target_start, values))
    return pieces


def _stage(checkpoint: Checkpoint, copies: list, name: str, like_: Tensor, dtype: torch.dtype,
           initial: float | complex) -> Tensor:
    """Bucket tensor ``name`` of this rank, checked and ready to copy into the live one, from the ranged
    reads ``copies``: a view of the saved bytes when one read covers it all (a load at the world size
    it was saved at), else fresh memory holding the reads and, where none reaches, ``initial``."""
    numel = like_.numel()
    if len(copies) == 1 and copies[0].target_start == 0 and copies[0].numel == numel:
        whole = copies[0]
        return checkpoint.view_range(whole.source_rank, whole.source_bucket, name, whole.source_start,
                                     whole.source_start + numel)
    return checkpoint.assemble(copies, name, numel, dtype=dtype, fill=initial)


def _names_covering(checkpoint: Checkpoint, layout: Any) -> list[str]:
    """The state names of the saved buckets holding any parameter of ``layout``: the same on every
    rank (a rank whose own range holds none of them still keeps the tensors, as its peers do)."""
    indices = {slot.index for slot in layout.slots}
    names: list[str] = []
    for bucket in checkpoint.buckets:
        if indices.intersection(slot.index for slot in bucket.layout.slots):
            names += [name for name in bucket.names if name not in names]
    return names


def _counts(checkpoint: Checkpoint, indices: list[int]) -> tuple[list[int], dict[str, list[float]]]:
    """Step counts and scalar state of the parameters ``indices``, from wherever they were saved."""
    by_index: dict[int, tuple[int, dict[str, float]]] = {}
    for bucket in checkpoint.buckets:
        for position, slot in enumerate(bucket.layout.slots):
            by_index[slot.index] = (bucket.steps[position], {k: v[position] for k, v in bucket.scalars.items()})
    names = sorted({name for _, scalars in by_index.values() for name in scalars})
    steps = [by_index[index][0] for index in indices]
    scalars = {name: [float(by_index[index][1].get(name, 0.0)) for index in indices] for name in names}
    return steps, scalars


def _saved_groups(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, saved: Any) -> list[dict[str, Any]]:
    """The saved groups, each hyper-parameter a tensor again where the live group holds a tensor."""
    _check_group_sizes(checkpoint, optimizer, saved)
    groups = []
    for live, group in zip(optimizer.param_groups, saved):
        groups.append({
            key: like(live[key], value) if key in live and key not in ("params", "param_names") else value
            for key, value in group.items()
        })
    return groups


def _check_group_sizes(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    if not isinstance(saved, list) or len(saved) != len(optimizer.param_groups):
        raise CheckpointError(f"{checkpoint.url}: the checkpoint's optimizer has another number of param groups")
    for i, (live, group) in enumerate(zip(optimizer.param_groups, saved)):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in params):
            raise CheckpointFormatError(f"{checkpoint.url}: param group {i} must list its parameters' indices")
        if len(params) != len(live["params"]):
            raise CheckpointError(f"{checkpoint.url}: param group {i} has another number of parameters")


def torch_format_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """The checkpoint's optimizer as one torch-format state dict (what ``torch.optim`` loads)."""
    saved = checkpoint.manifest.optimizer
    state: dict[int, dict[str, Any]] = per_parameter_state(checkpoint)
    step_in_state, state_at_start = _algorithm_traits(checkpoint.algorithm_class)
    for position, bucket in enumerate(checkpoint.buckets):
        fulls = {name: checkpoint.read_bucket(position, name) for name in bucket.names}
        for slot_position, slot in enumerate(bucket.layout.slots):
            steps = bucket.steps[slot_position]
            if steps == 0 and not state_at_start:
                continue
            entry: dict[str, Any] = {}
            if step_in_state:
                entry["step"] = torch.tensor(float(steps))
            for name, values in bucket.scalars.items():
                entry[name] = torch.tensor(values[slot_position])
            for name, full in fulls.items():
                entry[name] = full[slot.offset : slot.end].clone().view(slot.shape)
            state[slot.index] = entry
    return {"state": dict(sorted(state.items())), "param_groups": copy.deepcopy(saved["param_groups"])}


def _algorithm_traits(cls: type | None) -> tuple[bool, bool]:
    """Whether torch keeps ``step`` in this algorithm's state, and whether its state exists from the start."""
    rule = getattr(cls, "rule", None)
    return (rule.step_in_state if rule is not None else True), bool(getattr(cls, "state_at_construction", False))


# -- the model, schedulers, EMA, RNG ----------------------------------------------------------------


def _stage_model(checkpoint: Checkpoint, model: nn.Module, optimizer: Any, strict: bool) -> list:
    entries = model_entries(checkpoint)
    live = model.state_dict(keep_vars=True)
    missing, unexpected = live.keys() - entries.keys(), entries.keys() - live.keys()
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{checkpoint.url}: the model's keys differ from the checkpoint's: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    in_buckets = index_of_params(optimizer.param_groups) if isinstance(optimizer, Optimizer) else {}
    bucketed = {id(p) for bucket in optimizer.buckets for p in bucket.params} if isinstance(optimizer, Optimizer) else set()
    values: dict[str, Tensor] = {}
    for key, tensor in live.items():
        entry = entries.get(key)
        if entry is None:
            continue
        if "same_as" in entry:
            entry = entries[entry["same_as"]]
        if "param" in entry:
            if id(tensor) in bucketed:
                if in_buckets[id(tensor)] != entry["param"]:
                    raise CheckpointError(f"{checkpoint.url}: {key!r} is parameter {in_buckets[id(tensor)]} of the "
                                          f"optimizer, the checkpoint's {entry['param']}")
                continue  # restored through the optimizer's buckets
            value = checkpoint.read_parameter(entry["param"])
        else:
            value = checkpoint.read_shared(entry["tensor"], complex_=bool(entry.get("complex")))
        if value.shape != tensor.shape:
            raise CheckpointError(f"{checkpoint.url}: {key!r} has shape {tuple(tensor.shape)}, the saved one "
                                  f"{tuple(value.shape)}")
        values[key] = value

    def apply() -> None:
        with torch.no_grad():
            for key, value in values.items():
                live[key].copy_(value)

    return [apply]


def model_entries(checkpoint: Checkpoint) -> dict[str, dict[str, Any]]:
    """The manifest's model entries, each checked to be a parameter index, a shared tensor's key or a
    tie to another such entry."""
    saved = checkpoint.manifest.model
    if saved is None:
        raise CheckpointError(f"{checkpoint.url}: the checkpoint holds no model")
    entries = saved.get("entries")
    if not isinstance(entries, dict):
        raise CheckpointFormatError(f"{checkpoint.url}: model.entries must be an object")

    def plain(entry: Any) -> bool:
        if not isinstance(entry, dict):
            return False
        if set(entry) == {"param"}:
            return isinstance(entry["param"], int) and not isinstance(entry["param"], bool)
        return set(entry) <= {"tensor", "complex"} and isinstance(entry.get("tensor"), str) and (
            isinstance(entry.get("complex", False), bool)
        )

    for key, entry in entries.items():
        tied = isinstance(entry, dict) and set(entry) == {"same_as"} and plain(entries.get(entry["same_as"]))
        if not (plain(entry) or tied):
            raise CheckpointFormatError(
                f"{checkpoint.url}: model.entries[{key!r:.80}] is neither a parameter, a tensor nor a tie to one"
            )
    return entries


def _stage_schedulers(checkpoint: Checkpoint, schedulers: Sequence[Any], strict: bool) -> list:
    saved = checkpoint.manifest.schedulers
    if strict and len(saved) != len(schedulers):
        raise CheckpointError(f"{checkpoint.url}: {len(saved)} schedulers saved, {len(schedulers)} given")
    for index, (scheduler, state) in enumerate(zip(schedulers, saved)):
        # A copy (sharing the optimizer) refuses bad state before the real one changes.
        optimizer = getattr(scheduler, "optimizer", None)
        try:
            copy.deepcopy(scheduler, {id(optimizer): optimizer}).load_state_dict(copy.deepcopy(state))
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
            raise CheckpointFormatError(
                f"{checkpoint.url}: scheduler {index}'s saved state does not fit {type(scheduler).__name__}: {error}"
            ) from None

    def apply() -> None:
        for scheduler, state in zip(schedulers, saved):
            scheduler.load_state_dict(copy.deepcopy(state))

    return [apply]


def _stage_ema(checkpoint: Checkpoint, ema: Any) -> list:
    saved = checkpoint.manifest.ema
    if saved is None:
        raise CheckpointError(f"{checkpoint.url}: the checkpoint holds no EMA")
    if isinstance(ema, ShardedEMA):
        if saved.get("kind") != "sharded":
            raise CheckpointError(f"{checkpoint.url}: the saved EMA is {saved.get('kind')!r}, not a ShardedEMA")
        owner = ema.optimizer
        copies = _copies(checkpoint, owner, owner.comm.rank)
        shards = [_stage(checkpoint, [c for c in copies if c.target_bucket == position], "ema", shard, shard.dtype, 0.0)
                  for position, shard in enumerate(ema.shards)]
        state = {"decay": saved.get("decay"), "warmup": saved.get("warmup"), "num_updates": saved.get("num_updates"),
                 "shards": shards}
        try:
            ema.check_state_dict(state)
        except (TypeError, ValueError, KeyError) as error:
            raise CheckpointFormatError(f"{checkpoint.url}: the saved EMA does not fit this ShardedEMA: {error}") from None
        return [lambda: ema.load_state_dict(state)]
    if saved.get("kind") != "averaged_model":
        raise CheckpointError(f"{checkpoint.url}: the saved EMA is {saved.get('kind')!r}, not an AveragedModel")
    state = {key: checkpoint.read_shared(f"ema.{key}") for key in saved["keys"]}
    live = ema.state_dict()
    if live.keys() != state.keys():
        raise CheckpointError(f"{checkpoint.url}: the AveragedModel's keys differ from the saved one's")
    for key, value in state.items():
        if value.shape != live[key].shape:
            raise CheckpointError(f"{checkpoint.url}: EMA {key!r} has another shape")
    return [lambda: ema.load_state_dict(state)]


def _stage_rng(checkpoint: Checkpoint, rank: int) -> list:
    saved = checkpoint.manifest.rng
    if rank >= len(saved):
        return []  # a rank the saving run did not have: its generators stay as they are
    tensors = checkpoint.read_rng(rank)
    check_rng(tensors, saved[rank], where=f"{checkpoint.url}: rng[{rank}]")
    return [lambda: restore_rng(tensors, saved[rank])]
