"""``reshard(url, out, world_size=M)``: the same checkpoint for M ranks, computed from its files alone.

No optimizer is built. The target layouts are planned as a sharded optimizer at M ranks plans them
(:func:`plan_layouts`): per param group, from the saved parameter table (shapes, dtypes, devices,
trainability as the saved buckets record them), with the recorded ``bucket_cap_numel`` and
``backward_order`` when M > 1, whole buckets when M = 1; an algorithm that is not ``shardable``
(LBFGS, SparseAdam) keeps its saved buckets as they are. Then, per target rank, only the element
ranges it will own are read (``plan_copies``, each range checked against its CRCs), and the new
per-rank files, the shared file and the manifest are written with the same commit protocol as
``save``: every file create-only under a new save id, ``MANIFEST.json`` last, create-only.

Loading the result at M ranks gives bit for bit what loading the original at M ranks gives: the
state of each parameter travels unchanged, steps and scalars per parameter, the elements a saved
bucket had no tensor for take the algorithm's initial value (as ``load`` fills them), and RNG states
are kept for the ranks both world sizes have.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..core import BucketLayout, Optimizer, ParamSpec, plan_copies
from ..core.shard_state import initial_fill
from .capture import TENSOR, storable
from .consistency import check_consistency
from .errors import CheckpointError
from .manifest import MANIFEST, Manifest, rng_key, shard_file, shared_file, state_key
from .progress import SILENT, Progress
from .reader import Checkpoint, layouts, open_checkpoint
from .storage import Storage
from .tensorfile_writer import write_tensor_file

_MAX_WORLD_SIZE = 1 << 20


def plan_layouts(checkpoint: Checkpoint, world_size: int) -> list[BucketLayout]:
    """The optimizer's bucket layouts at ``world_size`` ranks, as the optimizer would plan them."""
    saved = checkpoint.manifest.optimizer or {}
    if not saved.get("shardable", True):
        return layouts(checkpoint.buckets)
    specs: dict[int, list[ParamSpec]] = defaultdict(list)
    for bucket in checkpoint.buckets:
        layout = bucket.layout
        for slot in layout.slots:
            specs[layout.group].append(ParamSpec(slot.index, layout.group, slot.shape, layout.dtype, layout.device,
                                                 layout.trainable))
    cls = checkpoint.algorithm_class or Optimizer
    groups = saved.get("param_groups", [])
    planned: list[BucketLayout] = []
    for group in sorted(specs):
        members = sorted(specs[group], key=lambda spec: spec.index)
        planned += cls.plan_group_buckets(members, groups[group] if group < len(groups) else {},
                                          world_size=world_size, bucket_cap_numel=saved.get("bucket_cap_numel"))
    return planned


def reshard(
    url: str,
    out: str,
    *,
    world_size: int,
    storage_options: dict[str, Any] | None = None,
    progress: Progress = SILENT,
) -> Manifest:
    """Write the checkpoint at ``url`` to ``out`` as a checkpoint of ``world_size`` ranks; its manifest.

    ``FileExistsError`` when a committed checkpoint is at ``out``. Reads only what the new shards
    need (module docstring); no process group, one process.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size <= _MAX_WORLD_SIZE:
        raise ValueError(f"world_size must be an integer in [1, {_MAX_WORLD_SIZE}], got {world_size!r}")
    checkpoint = open_checkpoint(url, storage_options)
    check_consistency(checkpoint)
    target = Storage(out, storage_options)
    if target.exists(MANIFEST):
        raise FileExistsError(f"{target.url_of(MANIFEST)}: a committed checkpoint is there already")
    source = checkpoint.manifest
    saved = source.optimizer
    new_layouts = plan_layouts(checkpoint, world_size) if saved is not None else []
    buckets = [_bucket_entry(checkpoint, layout) for layout in new_layouts]
    save_id = f"{secrets.randbits(47):012x}"
    kept_ranks = min(world_size, source.world_size)
    tensors_per_bucket = 2 if (source.ema or {}).get("kind") == "sharded" else 1  # the parameters, the EMA
    progress.start(sum(_bytes(layout) * (len(entry["names"]) + tensors_per_bucket)
                       for layout, entry in zip(new_layouts, buckets)), "reshard")
    owned, per_parameter = _owned_state(checkpoint, new_layouts, world_size)
    files = {}
    try:
        for rank in range(world_size):
            tensors = _rank_tensors(checkpoint, new_layouts, buckets, rank, progress)
            tensors.update(owned[rank])
            if rank < kept_ranks:
                tensors.update({rng_key(rank, name): state for name, state in checkpoint.read_rng(rank).items()})
            name = shard_file(rank, world_size, save_id)
            files[name] = write_tensor_file(target, name, tensors, exclusive=True)
        shared = checkpoint.shared_reader()
        name = shared_file(save_id)
        files[name] = write_tensor_file(target, name, {key: shared.read(key) for key in shared.names}, exclusive=True)
    finally:
        progress.close()
    optimizer = None if saved is None else {**saved, "buckets": buckets, "per_parameter": per_parameter}
    manifest = replace(source, save_id=save_id, world_size=world_size, files=files, optimizer=optimizer,
                       rng=source.rng[:kept_ranks])
    target.write_bytes(MANIFEST, manifest.to_bytes(), exclusive=True)
    return manifest


def _owned_state(
    checkpoint: Checkpoint, new_layouts: list[BucketLayout], world_size: int
) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """Per new rank, the per-parameter state it owns whole (a matrix algorithm's, which the saving
    ranks kept in their own files), moved whole to the new owner; and the manifest's ``per_parameter``
    pointing there. State in the shared file stays where it is."""
    per_parameter = dict((checkpoint.manifest.optimizer or {}).get("per_parameter", {}))
    tensors: list[dict[str, Tensor]] = [{} for _ in range(world_size)]
    owner = {layout.slots[segment.slot].index: rank
             for layout in new_layouts for rank in range(layout.world_size) for segment in layout.segments(rank)}

    def move(value: Any, rank: int, key: str) -> Any:
        if isinstance(value, dict) and TENSOR in value:
            if "rank" not in value:
                return value
            tensors[rank][key] = storable(checkpoint.tensors_in(value))
            return {**value, TENSOR: key, "rank": rank}
        if isinstance(value, dict):
            return {k: move(v, rank, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [move(v, rank, f"{key}.{i}") for i, v in enumerate(value)]
        return value

    for index, entry in per_parameter.items():
        rank = owner.get(int(index), 0)
        per_parameter[index] = move(entry, rank, f"r{rank}.perparam.{index}")
    return tensors, per_parameter


def _bytes(layout: BucketLayout) -> int:
    return layout.numel * layout.dtype.itemsize


def _bucket_entry(checkpoint: Checkpoint, layout: BucketLayout) -> dict[str, Any]:
    """The manifest entry of a new bucket: its layout, and per slot the steps and scalars saved for
    that parameter; its state names are those of every saved bucket holding one of its parameters."""
    by_index: dict[int, tuple[int, dict[str, float]]] = {}
    names: list[str] = []
    indices = {slot.index for slot in layout.slots}
    for bucket in checkpoint.buckets:
        for position, slot in enumerate(bucket.layout.slots):
            by_index[slot.index] = (bucket.steps[position], {k: v[position] for k, v in bucket.scalars.items()})
        if indices.intersection(slot.index for slot in bucket.layout.slots):
            names += [name for name in bucket.names if name not in names]
    scalar_names = sorted({name for index in indices for name in by_index[index][1]})
    return {
        "layout": layout.to_dict(),
        "steps": [by_index[slot.index][0] for slot in layout.slots],
        "scalars": {name: [float(by_index[slot.index][1].get(name, 0.0)) for slot in layout.slots]
                    for name in scalar_names},
        "names": names,
    }


def _rank_tensors(
    checkpoint: Checkpoint, new_layouts: list[BucketLayout], buckets: list[dict[str, Any]], rank: int,
    progress: Progress,
) -> dict[str, Tensor]:
    """Rank ``rank``'s shards of every new bucket it writes: state, parameters and a sharded EMA."""
    initial = _initial_values(checkpoint)
    with_ema = (checkpoint.manifest.ema or {}).get("kind") == "sharded"
    # Every layout has the same number of shards; ranks past it (a replicated optimizer's) write none.
    owns = bool(new_layouts) and rank < new_layouts[0].world_size
    copies = plan_copies(layouts(checkpoint.buckets), new_layouts, rank) if owns else []
    tensors: dict[str, Tensor] = {}
    for position, (layout, entry) in enumerate(zip(new_layouts, buckets)):
        if not (layout.is_sharded or rank == 0):
            continue  # a whole bucket is in rank 0's file only
        mine = [c for c in copies if c.target_bucket == position]
        for name in ["param", *entry["names"], *(["ema"] if with_ema else [])]:
            fill = initial(layout.group).get(name, 0.0) if name in entry["names"] else 0.0
            reads = [c for c in mine if name in ("param", "ema") or name in checkpoint.buckets[c.source_bucket].names]
            shard = checkpoint.assemble(reads, name, layout.shard_numel(rank), dtype=_stored_dtype(checkpoint, layout, name),
                                        fill=initial_fill(fill, layout.dtype))
            tensors[state_key(rank, position, name)] = storable(shard)
            progress.advance(shard.nbytes)
    return tensors


def _stored_dtype(checkpoint: Checkpoint, layout: BucketLayout, name: str) -> torch.dtype:
    """The dtype the saved buckets of ``layout``'s group and dtype keep ``name`` in (the same for every
    rank of the new checkpoint, whichever ranges it copies): wider than the parameters under
    ``state_dtype``."""
    for position, saved in enumerate(checkpoint.buckets):
        same_kind = (saved.layout.group, saved.layout.dtype) == (layout.group, layout.dtype)
        if same_kind and (name in saved.names or name in ("param", "ema")):
            return checkpoint.stored_dtype(position, name)
    return layout.dtype


def _initial_values(checkpoint: Checkpoint) -> Any:
    """Per group, the value each state tensor starts at (what ``load`` puts where nothing was saved)."""
    saved = checkpoint.manifest.optimizer or {}
    cls = checkpoint.algorithm_class or Optimizer
    groups = saved.get("param_groups", [])
    cache: dict[int, dict[str, float]] = {}

    def initial(group: int) -> dict[str, float]:
        if group not in cache:
            try:
                cache[group] = cls.initial_bucket_state(groups[group])
            except (AttributeError, TypeError, ValueError, IndexError) as error:
                raise CheckpointError(f"{checkpoint.url}: param group {group}'s hyper-parameters do not give "
                                      f"{saved.get('algorithm')}'s initial state: {error}") from None
        return cache[group]

    return initial
