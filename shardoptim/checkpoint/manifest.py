"""``MANIFEST.json``: everything of a checkpoint that is not a tensor, and the commit of the save.

A checkpoint directory holds one safetensors file per rank (that rank's shards of the optimizer's
flat state and parameters, its RNG state), one file of tensors every rank holds whole (the model's
buffers and the parameters outside the optimizer, replicated optimizer state, an ``AveragedModel``),
written by rank 0, and this manifest, written last and create-only by rank 0: a directory without
it is an incomplete save. ``docs/checkpoint-format.md`` describes the format; this module is its
schema, checked field by field before a reader trusts anything in it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointFormatError
from .json_codec import decode_json, encode_json
from .storage import check_name
from .tensorfile_record import TensorFileRecord

MANIFEST = "MANIFEST.json"
FORMAT = "shardoptim-checkpoint"
VERSION = 1
_SAVE_ID = re.compile(r"[0-9a-f]{12}")
_MAX_WORLD = 1 << 20
MAX_RUN_CHARS = 200


def shard_file(rank: int, world_size: int, save_id: str) -> str:
    """The name of rank ``rank``'s file: its shards and its RNG state."""
    return f"rank{rank:05d}-of-{world_size:05d}.{save_id}.safetensors"


def shared_file(save_id: str) -> str:
    """The name of the file of tensors every rank holds whole (written by rank 0)."""
    return f"shared.{save_id}.safetensors"


_SAVE_FILE = re.compile(
    r"\.?(rank\d{5}-of-\d{5}\.[0-9a-f]{12}\.safetensors|shared\.[0-9a-f]{12}\.safetensors"
    r"|record-rank\d{5}\.[0-9a-f]{12}\.json)(\.tmp-[0-9a-f]+)?"
)


def is_save_file(name: str) -> bool:
    """Whether ``name`` is one a save writes (a rank's file, the shared one, a record, or one of
    their temporaries), as opposed to a file of the user's next to them."""
    return _SAVE_FILE.fullmatch(name) is not None


def record_file(rank: int, save_id: str) -> str:
    """Where rank ``rank`` leaves the record of its file for rank 0 to put in the manifest."""
    return f"record-rank{rank:05d}.{save_id}.json"


def state_key(rank: int, bucket: int, name: str) -> str:
    """The key of rank ``rank``'s shard of one bucket's state tensor (``param`` is the parameters).

    The rank is part of the key (unlike DCP, which keeps one rank's tensor of a key and drops the
    others'), so files of every rank can be read side by side, or merged, without ambiguity.
    """
    return f"r{rank}.b{bucket}.{name}"


def rng_key(rank: int, generator: str) -> str:
    """The key of one of rank ``rank``'s random generator states, in that rank's file."""
    return f"r{rank}.rng.{generator}"


def topology_of(params: Sequence[Mapping[str, Any]]) -> str:
    """A digest of the parameter table (order, shapes, dtypes, groups): equal tables, equal digests."""
    canonical = json.dumps([[p["shape"], p["dtype"], p["group"]] for p in params], separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Manifest:
    """The schema of ``MANIFEST.json``; ``from_bytes`` refuses anything that does not fit it.

    ``params`` is the optimizer's parameter table, in its order: ``{"index", "group", "name",
    "shape", "dtype"}``. ``optimizer`` holds the algorithm, the torch-format ``param_groups`` as JSON
    data, and per bucket its layout (``BucketLayout.to_dict()``: slots, every rank's range) with its
    ``steps``, ``scalars`` and the ``names`` of its state tensors; whether each rank's shards of a
    bucket are in that rank's file under :func:`state_key`. ``model`` maps each ``state_dict()`` key
    either to a parameter index of the optimizer or to a key of the shared file. ``files`` holds the
    record (size, digest, CRCs) of every file the checkpoint consists of.
    """

    save_id: str
    world_size: int
    files: dict[str, TensorFileRecord]
    params: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    schedulers: list[Any] = field(default_factory=list)
    ema: dict[str, Any] | None = None
    rng: list[Any] = field(default_factory=list)
    extra: Any = None
    step: int | None = None
    metric: float | None = None
    run: str | None = None

    @property
    def topology(self) -> str:
        return topology_of(self.params)

    def to_bytes(self) -> bytes:
        return encode_json(
            {
                "format": FORMAT, "version": VERSION, "save_id": self.save_id, "world_size": self.world_size,
                "step": self.step, "metric": self.metric, "run": self.run, "topology": self.topology, "params": self.params,
                "optimizer": self.optimizer, "model": self.model, "schedulers": self.schedulers, "ema": self.ema,
                "rng": self.rng, "extra": self.extra,
                "files": {name: record.to_dict() for name, record in self.files.items()},
            },
            indent=1,
        )

    @staticmethod
    def from_bytes(data: bytes, *, source: str) -> Manifest:
        """Decode and check a manifest; ``CheckpointFormatError`` naming ``source`` and the field otherwise."""
        tree = decode_json(data, source=source)
        top = _fields(tree, {"format", "version", "save_id", "world_size", "files"},
                      {"step", "metric", "run", "topology", "params", "optimizer", "model", "schedulers", "ema",
                       "rng", "extra"}, source)
        if top["format"] != FORMAT:
            raise CheckpointFormatError(f"{source}: not a shardoptim checkpoint manifest (format {top['format']!r})")
        if top["version"] != VERSION:
            raise CheckpointFormatError(
                f"{source}: format version {top['version']!r}; this shardoptim reads version {VERSION}"
            )
        save_id = top["save_id"]
        if not isinstance(save_id, str) or not _SAVE_ID.fullmatch(save_id):
            raise CheckpointFormatError(f"{source}: save_id {save_id!r} is not 12 hex digits")
        world_size = _int(top["world_size"], f"{source}: world_size", 1, _MAX_WORLD)
        files = top["files"]
        if not isinstance(files, dict) or not files:
            raise CheckpointFormatError(f"{source}: files must be a non-empty object")
        records = {}
        for name, record in files.items():
            check_name(name)
            records[name] = TensorFileRecord.from_dict(record, source=f"{source}: files[{name!r}]")
            if records[name].name != name:
                raise CheckpointFormatError(f"{source}: files[{name!r}] describes {records[name].name!r}")
        manifest = Manifest(
            save_id=save_id, world_size=world_size, files=records,
            params=_param_table(top.get("params", []), source),
            optimizer=_object_or_none(top.get("optimizer"), f"{source}: optimizer"),
            model=_object_or_none(top.get("model"), f"{source}: model"),
            schedulers=_list(top.get("schedulers", []), f"{source}: schedulers"),
            ema=_object_or_none(top.get("ema"), f"{source}: ema"),
            rng=_list(top.get("rng", []), f"{source}: rng"),
            extra=top.get("extra"),
            step=None if top.get("step") is None else _int(top["step"], f"{source}: step", 0, 1 << 62),
            metric=_metric(top.get("metric"), source),
            run=_run(top.get("run"), source),
        )
        if "topology" in top and top["topology"] != manifest.topology:
            raise CheckpointFormatError(f"{source}: the topology digest does not match the parameter table")
        return manifest


def _fields(data: Any, required: set[str], optional: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{where}: expected an object, got {type(data).__name__}")
    missing, unknown = required - data.keys(), data.keys() - required - optional
    if missing:
        raise CheckpointFormatError(f"{where}: missing {sorted(missing)}")
    if unknown:
        raise CheckpointFormatError(f"{where}: unknown fields {sorted(unknown)}")
    return data


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointFormatError(f"{where}: expected an integer in [{low}, {high}], got {value!r:.80}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise CheckpointFormatError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _object_or_none(value: Any, where: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise CheckpointFormatError(f"{where}: expected an object or null, got {type(value).__name__}")
    return value


def _run(value: Any, source: str) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_RUN_CHARS):
        raise CheckpointFormatError(
            f"{source}: run must be a string of at most {MAX_RUN_CHARS} characters, got {value!r:.80}")
    return value


def _metric(value: Any, source: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointFormatError(f"{source}: metric must be a finite number, got {value!r:.80}")
    return float(value)


_DTYPES = {
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "bfloat16",
    "float32", "float64", "complex64", "complex128",
}


def _param_table(raw: Any, source: str) -> list[dict[str, Any]]:
    table = []
    for position, entry in enumerate(_list(raw, f"{source}: params")):
        where = f"{source}: params[{position}]"
        entry = _fields(entry, {"index", "group", "shape", "dtype"}, {"name"}, where)
        _int(entry["index"], f"{where}.index", 0, 1 << 40)
        _int(entry["group"], f"{where}.group", 0, 1 << 20)
        shape = _list(entry["shape"], f"{where}.shape")
        if len(shape) > 64:
            raise CheckpointFormatError(f"{where}.shape: more than 64 dimensions")
        for size in shape:
            _int(size, f"{where}.shape", 0, 1 << 48)
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in _DTYPES:
            raise CheckpointFormatError(f"{where}.dtype: unknown dtype {entry['dtype']!r:.40}")
        name = entry.get("name")
        if name is not None and not isinstance(name, str):
            raise CheckpointFormatError(f"{where}.name: expected a string or null")
        table.append(dict(entry))
    return table
