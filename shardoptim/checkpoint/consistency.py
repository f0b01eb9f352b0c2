"""Cross-checks of a manifest against itself and its files' records, before any tensor is read.

``Manifest.from_bytes`` checks each field's type; this checks that the fields agree with each other:
every file the format needs is listed and nothing else; each bucket's slots are parameters of the
table with its shape, dtype and group, inside the bucket and not overlapping; every tensor the
optimizer, the model and the EMA refer to is in the file record where a reader will look for it,
with the number of elements the layout implies. The records' sizes are bounded by the files' real
sizes (checked when a file is opened), so after this nothing a tool allocates from the manifest's
numbers can exceed what the files hold. Nothing here reads a file; the tools run it first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..core import BucketLayout
from .capture import TENSOR
from .errors import CheckpointFormatError
from .manifest import shard_file, shared_file, state_key
from .reader import Checkpoint, dtype_named
from .safetensors_header import dtype_code
from .tensorfile_record import TensorRecord


def check_consistency(checkpoint: Checkpoint) -> None:
    """Raise ``CheckpointFormatError`` naming the first disagreement inside ``checkpoint``'s manifest."""
    _Checks(checkpoint).run()


class _Checks:
    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.manifest = checkpoint.manifest
        self.url = checkpoint.url
        self.tensors: dict[str, dict[str, TensorRecord]] = {
            name: {t.name: t for t in record.tensors} for name, record in self.manifest.files.items()
        }

    def fail(self, message: str) -> None:
        raise CheckpointFormatError(f"{self.url}: {message}")

    def run(self) -> None:
        self.files()
        params = self.param_table()
        bucketed = self.optimizer(params)
        self.model(bucketed)
        self.ema()
        if len(self.manifest.rng) > self.manifest.world_size:
            self.fail(f"rng lists {len(self.manifest.rng)} ranks, the world size is {self.manifest.world_size}")

    def files(self) -> None:
        manifest = self.manifest
        expected = {shard_file(rank, manifest.world_size, manifest.save_id) for rank in range(manifest.world_size)}
        expected.add(shared_file(manifest.save_id))
        listed = set(manifest.files)
        if expected - listed:
            self.fail(f"the manifest lacks the file(s) {sorted(expected - listed)[:4]} that save {manifest.save_id} "
                      f"of {manifest.world_size} rank(s) writes")
        if listed - expected:
            self.fail(f"the manifest lists file(s) {sorted(listed - expected)[:4]} that are not part of the checkpoint")

    def record(self, file: str, key: str, where: str) -> TensorRecord:
        record = self.tensors.get(file, {}).get(key)
        if record is None:
            self.fail(f"{where}: no tensor {key!r} in {file}")
        return record

    def param_table(self) -> dict[int, dict[str, Any]]:
        params: dict[int, dict[str, Any]] = {}
        for entry in self.manifest.params:
            if entry["index"] in params:
                self.fail(f"params: parameter {entry['index']} is listed twice")
            params[entry["index"]] = entry
        return params

    def optimizer(self, params: Mapping[int, dict[str, Any]]) -> set[int]:
        saved = self.manifest.optimizer
        if saved is None:
            return set()
        if not isinstance(saved.get("algorithm"), str) or not saved["algorithm"].isidentifier():
            self.fail(f"optimizer.algorithm must be a class name, got {saved.get('algorithm')!r:.80}")
        if not isinstance(saved.get("torch", False), bool):
            self.fail("optimizer.torch must be true or false")
        groups = saved.get("param_groups")
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            self.fail("optimizer.param_groups must be a list of objects")
        listed: list[int] = []
        for position, group in enumerate(groups):
            members = group.get("params")
            if not isinstance(members, list) or not all(type(i) is int for i in members):
                self.fail(f"optimizer.param_groups[{position}].params must be a list of parameter indices")
            listed += members
        unknown = sorted(set(listed) - params.keys())
        if unknown:
            self.fail(f"optimizer.param_groups name parameter(s) {unknown[:8]} that are not in the parameter table")
        for index, entry in params.items():
            if not 0 <= entry["group"] < len(groups):
                self.fail(f"params: parameter {index} is in group {entry['group']}, of {len(groups)}")
        per_parameter = saved.get("per_parameter", {})
        if not isinstance(per_parameter, dict) or not all(isinstance(v, dict) for v in per_parameter.values()):
            self.fail("optimizer.per_parameter must be an object of objects")
        for key in per_parameter:
            if not (key.isdigit() and int(key) in params):
                self.fail(f"optimizer.per_parameter: {key!r:.40} is not a parameter index of the table")
        self.tensor_refs(saved.get("per_parameter", {}), "optimizer.per_parameter")
        bucketed: set[int] = set()
        for position, bucket in enumerate(self.checkpoint.buckets):
            bucketed |= self.bucket(position, bucket.layout, bucket.names, params, bucketed)
        return bucketed

    def bucket(
        self, position: int, layout: BucketLayout, names: list[str], params: Mapping[int, dict[str, Any]],
        seen: set[int],
    ) -> set[int]:
        where = f"optimizer.buckets[{position}]"
        if layout.world_size not in (1, self.manifest.world_size):
            self.fail(f"{where}: cut into {layout.world_size} shards in a checkpoint of {self.manifest.world_size} ranks")
        indices, end = set(), 0
        for slot in layout.slots:
            entry = params.get(slot.index)
            if entry is None:
                self.fail(f"{where}: parameter {slot.index} is not in the parameter table")
            if slot.index in seen or slot.index in indices:
                self.fail(f"{where}: parameter {slot.index} is in more than one bucket slot")
            if list(slot.shape) != entry["shape"] or entry["dtype"] != str(layout.dtype).removeprefix("torch."):
                self.fail(f"{where}: parameter {slot.index}'s shape or dtype differs from the parameter table's")
            if entry["group"] != layout.group:
                self.fail(f"{where}: parameter {slot.index} is in group {entry['group']}, the bucket in {layout.group}")
            if slot.offset < end or slot.end > layout.numel:
                self.fail(f"{where}: the slot of parameter {slot.index} overlaps another or leaves the bucket")
            end = slot.end
            indices.add(slot.index)
        if len(set(names)) != len(names) or "param" in names or "ema" in names:
            self.fail(f"{where}: names must be distinct state names")
        kept = names + ["param"] + (["ema"] if (self.manifest.ema or {}).get("kind") == "sharded" else [])
        scale = 2 if layout.dtype.is_complex else 1
        stored = dtype_code(_real(layout.dtype))
        for rank in range(layout.world_size):
            file = shard_file(rank, self.manifest.world_size, self.manifest.save_id)
            for name in kept:
                key = state_key(rank, position, name)
                record = self.record(file, key, where)
                if math.prod(record.shape) != layout.shard_numel(rank) * scale:
                    self.fail(f"{where}: {key} in {file} has shape {list(record.shape)}, the layout says "
                              f"{layout.shard_numel(rank)} elements")
                if name == "param" and record.dtype != stored:
                    self.fail(f"{where}: {key} in {file} is {record.dtype}, the bucket {layout.dtype}")
        return indices

    def tensor_refs(self, value: Any, where: str) -> None:
        """Every ``{"$tensor": key}`` inside JSON data must be a tensor of the shared file (of rank
        ``r``'s file, with ``"rank": r``)."""
        if isinstance(value, dict) and TENSOR in value:
            key = value[TENSOR]
            if not isinstance(key, str):
                self.fail(f"{where}: a tensor reference must be a key")
            if "rank" not in value:
                self.record(shared_file(self.manifest.save_id), key, where)
                return
            rank, world = value["rank"], self.manifest.world_size
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
                self.fail(f"{where}: a tensor reference names rank {rank!r:.40}, outside the {world} that saved")
            self.record(shard_file(rank, world, self.manifest.save_id), key, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                self.tensor_refs(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self.tensor_refs(item, f"{where}[{i}]")

    def model(self, bucketed: set[int]) -> None:
        saved = self.manifest.model
        if saved is None:
            return
        entries = saved.get("entries")
        if not isinstance(entries, dict):
            self.fail("model.entries must be an object")
        shared = shared_file(self.manifest.save_id)
        for key, entry in entries.items():
            where = f"model.entries[{key!r}]"
            if not isinstance(entry, dict) or len(entry.keys() & {"param", "tensor", "same_as"}) != 1:
                self.fail(f"{where}: expected one of param, tensor, same_as")
            if "param" in entry and entry["param"] not in bucketed:
                self.fail(f"{where}: parameter {entry['param']!r:.40} is in none of the optimizer's buckets")
            if "tensor" in entry:
                if not isinstance(entry["tensor"], str):
                    self.fail(f"{where}: tensor must be a key")
                self.record(shared, entry["tensor"], where)
            if "same_as" in entry:
                target = entries.get(entry["same_as"]) if isinstance(entry["same_as"], str) else None
                if not isinstance(target, dict) or "same_as" in target:
                    self.fail(f"{where}: same_as must name another key that holds a tensor")

    def ema(self) -> None:
        saved = self.manifest.ema
        if saved is None:
            return
        kind = saved.get("kind")
        if kind == "sharded":
            if not self.checkpoint.buckets:
                self.fail("ema: a sharded EMA without optimizer buckets")
        elif kind == "averaged_model":
            keys = saved.get("keys")
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                self.fail("ema.keys must be a list of keys")
            for key in keys:
                self.record(shared_file(self.manifest.save_id), f"ema.{key}", "ema")
        else:
            self.fail(f"ema.kind must be 'sharded' or 'averaged_model', got {kind!r:.40}")


def _real(dtype: Any) -> Any:
    """The dtype a file stores ``dtype`` as (complex as pairs of reals)."""
    return {"complex64": dtype_named("float32"), "complex128": dtype_named("float64")}.get(
        str(dtype).removeprefix("torch."), dtype
    )
