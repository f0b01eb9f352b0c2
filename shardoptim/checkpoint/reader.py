"""Reading a committed checkpoint: the manifest checked, every byte verified before it is used.

``open_checkpoint(url)`` refuses a directory without a manifest (an incomplete save) and a manifest
that does not fit the schema; its readers check each file against the size, header CRC and
per-block CRCs the manifest recorded, so a flipped bit or a truncated file is refused naming the
file and the tensor. Ranged reads fetch only the element ranges asked for: resharding reads, per
rank, just what that rank will own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core import BucketLayout, Copy
from .capture import TENSOR
from .errors import CheckpointError, CheckpointFormatError
from .manifest import MANIFEST, Manifest, rng_key, shard_file, shared_file, state_key
from .storage import Storage
from .tensorfile_reader import TensorFileReader

_DTYPES = {name: getattr(torch, name) for name in (
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "bfloat16",
    "float32", "float64", "complex64", "complex128",
)}


def dtype_named(name: str) -> torch.dtype:
    return _DTYPES[name]


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint directory whose save never committed (it has no manifest)."""


@dataclass
class SourceBucket:
    """One bucket of the checkpoint's optimizer, as saved: its layout, counts and state names."""

    layout: BucketLayout
    steps: list[int]
    scalars: dict[str, list[float]]
    names: list[str]


class Checkpoint:
    """A committed checkpoint opened for reading; collective nowhere (each rank opens its own)."""

    def __init__(self, storage: Storage, manifest: Manifest) -> None:
        self.storage = storage
        self.manifest = manifest
        self._readers: dict[str, TensorFileReader] = {}
        self._slots: dict[int, tuple[int, Any]] | None = None  # parameter index -> (bucket, slot)
        raw_buckets = (manifest.optimizer or {}).get("buckets", [])
        if not isinstance(raw_buckets, list):
            raise CheckpointFormatError(f"{storage.url}: optimizer.buckets must be a list")
        self.buckets = [_source_bucket(raw, position, storage.url) for position, raw in enumerate(raw_buckets)]

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def algorithm_class(self) -> type | None:
        """shardoptim's optimizer class of the algorithm the optimizer was saved as, if it has one."""
        import shardoptim  # here: shardoptim imports this package while it initialises

        cls = getattr(shardoptim, str((self.manifest.optimizer or {}).get("algorithm")), None)
        return cls if isinstance(cls, type) and issubclass(cls, shardoptim.Optimizer) else None

    def reader(self, name: str) -> TensorFileReader:
        """A reader of one of the checkpoint's files, checked against its record in the manifest."""
        reader = self._readers.get(name)
        if reader is None:
            record = self.manifest.files.get(name)
            if record is None:
                raise CheckpointError(f"{self.url}: the manifest lists no file {name!r}")
            reader = self._readers[name] = TensorFileReader(self.storage, name, expected=record)
        return reader

    def shard_reader(self, rank: int) -> TensorFileReader:
        return self.reader(shard_file(rank, self.manifest.world_size, self.manifest.save_id))

    def shared_reader(self) -> TensorFileReader:
        return self.reader(shared_file(self.manifest.save_id))

    def verify(self) -> None:
        """Check every file against its digest (reads every byte); raise naming the first bad one."""
        for name in self.manifest.files:
            self.reader(name).verify()

    # -- bucket data ----------------------------------------------------------------------------

    def read_range(self, rank: int, bucket: int, name: str, start: int, stop: int) -> Tensor:
        """Elements ``[start, stop)`` of rank ``rank``'s shard of one bucket's tensor ``name``
        (``"param"``: the parameters; ``"ema"``: a sharded EMA), in the dtype it was saved in."""
        return self._range(rank, bucket, name, start, stop, view=False)

    def view_range(self, rank: int, bucket: int, name: str, start: int, stop: int) -> Tensor:
        """:meth:`read_range` as a view of the saved bytes where they are local
        (:meth:`TensorFileReader.view_range`): only to copy from, at once."""
        return self._range(rank, bucket, name, start, stop, view=True)

    def assemble(self, copies: Sequence[Copy], name: str, numel: int, *, dtype: torch.dtype,
                 fill: float | complex) -> Tensor:
        """A new shard of ``numel`` elements of bucket tensor ``name``, in fresh memory, from the ranged
        reads ``copies`` (``core.plan_copies``), ``fill`` where none reaches."""
        if sum(copy_.numel for copy_ in copies) == numel:  # the reads are disjoint: they cover it all
            shard = torch.empty(numel, dtype=dtype)
        else:
            shard = torch.full((numel,), fill, dtype=dtype)
        for copy_ in copies:
            shard[copy_.target_start : copy_.target_start + copy_.numel] = self.view_range(
                copy_.source_rank, copy_.source_bucket, name, copy_.source_start, copy_.source_start + copy_.numel)
        return shard

    def _range(self, rank: int, bucket: int, name: str, start: int, stop: int, *, view: bool) -> Tensor:
        dtype = self.buckets[bucket].layout.dtype
        scale = 2 if dtype.is_complex else 1  # stored as the real view
        reader, key = self._rank_reader_with(rank, state_key(rank, bucket, name))
        read = reader.view_range if view else reader.read_range
        values = read(key, start * scale, stop * scale)
        return torch.view_as_complex(values.view(-1, 2)) if dtype.is_complex else values

    def read_rng(self, rank: int) -> dict[str, Tensor]:
        """Rank ``rank``'s saved random generator states, by generator name."""
        reader, prefix = self.shard_reader(rank), rng_key(rank, "")
        return {name.removeprefix(prefix): reader.read(name) for name in reader.names if name.startswith(prefix)}

    def stored_dtype(self, bucket: int, name: str) -> torch.dtype:
        """The dtype bucket ``bucket``'s tensor ``name`` was saved in: the bucket's, or a wider one
        (state and master kept in ``state_dtype``)."""
        reader, key = self._rank_reader_with(0, state_key(0, bucket, name))
        dtype = reader.entry(key).dtype
        return dtype.to_complex() if self.buckets[bucket].layout.dtype.is_complex else dtype

    def read_parameter(self, index: int, *, name: str = "param") -> Tensor:
        """One of the optimizer's parameters, whole, from every rank's shard of its bucket; with
        ``name``, that parameter's part of another bucket tensor instead (a state name, ``"ema"``)."""
        if self._slots is None:
            self._slots = {slot.index: (position, slot) for position, bucket in enumerate(self.buckets)
                           for slot in bucket.layout.slots}
        if index not in self._slots:
            raise CheckpointError(f"{self.url}: parameter {index} is in none of the optimizer's buckets")
        position, slot = self._slots[index]
        layout = self.buckets[position].layout
        whole = torch.empty(slot.numel, dtype=layout.dtype)
        for rank in range(layout.world_size):  # the ranks' ranges tile the bucket; the slot is where it lies
            start, stop = layout.shard_range(rank)
            lo, hi = max(start, slot.offset), min(stop, slot.end)
            if lo < hi:
                whole[lo - slot.offset : hi - slot.offset] = self.read_range(rank, position, name, lo - start, hi - start)
        return whole.view(slot.shape)

    def read_bucket(self, bucket: int, name: str) -> Tensor:
        """Bucket ``bucket``'s tensor ``name`` whole (every rank's range, padding included), in the dtype
        it was saved in."""
        layout = self.buckets[bucket].layout
        whole = torch.empty(layout.numel, dtype=self.stored_dtype(bucket, name))
        for rank in range(layout.world_size):
            start, stop = layout.shard_range(rank)
            whole[start:stop] = self.read_range(rank, bucket, name, 0, stop - start)
        return whole

    def read_shared(self, key: str, *, complex_: bool = False) -> Tensor:
        reader = self.shared_reader()
        if key not in reader.names:
            raise CheckpointFormatError(f"{self.url}: the shared file has no tensor {key!r:.100}")
        values = reader.read(key)
        return torch.view_as_complex(values) if complex_ else values

    def read_owned(self, rank: Any, key: str, *, complex_: bool = False) -> Tensor:
        """A tensor of rank ``rank``'s file outside the buckets (a matrix algorithm's per-parameter
        state, kept by the parameter's owner)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.manifest.world_size:
            raise CheckpointFormatError(f"{self.url}: a tensor reference names rank {rank!r:.40}, not one of "
                                        f"the {self.manifest.world_size} that saved")
        reader, key = self._rank_reader_with(rank, key)
        values = reader.read(key)
        return torch.view_as_complex(values) if complex_ else values

    def _rank_reader_with(self, rank: int, key: str) -> tuple[TensorFileReader, str]:
        """Rank ``rank``'s file, which the manifest says holds tensor ``key``; refused if it does not."""
        reader = self.shard_reader(rank)
        if key not in reader.names:
            raise CheckpointFormatError(f"{reader_url(self, rank)}: the manifest expects a tensor {key!r:.100} there")
        return reader, key

    def tensors_in(self, value: Any) -> Any:
        """JSON data of per-parameter state with its tensors read back from the shared file (or, for
        a reference that names a rank, that rank's file)."""
        if isinstance(value, dict) and TENSOR in value:
            if "rank" in value:
                return self.read_owned(value["rank"], value[TENSOR], complex_=bool(value.get("complex")))
            return self.read_shared(value[TENSOR], complex_=bool(value.get("complex")))
        if isinstance(value, dict):
            return {key: self.tensors_in(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.tensors_in(item) for item in value]
        return value


def reader_url(checkpoint: Checkpoint, rank: int) -> str:
    return checkpoint.storage.url_of(shard_file(rank, checkpoint.manifest.world_size, checkpoint.manifest.save_id))


def open_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """The committed checkpoint at ``url``: ``IncompleteCheckpointError`` without a manifest."""
    storage = Storage(url, storage_options)
    try:
        data = storage.read_bytes(MANIFEST)
    except FileNotFoundError:
        if storage.exists():
            raise IncompleteCheckpointError(
                f"{url}: not a complete checkpoint: it has no {MANIFEST} (the save was interrupted before "
                "it committed, or is still running)"
            ) from None
        raise FileNotFoundError(f"no checkpoint at {url}") from None
    return Checkpoint(storage, Manifest.from_bytes(data, source=storage.url_of(MANIFEST)))


def _source_bucket(raw: Any, position: int, url: str) -> SourceBucket:
    where = f"{url}: optimizer.buckets[{position}]"
    if not isinstance(raw, dict) or not {"layout", "steps", "scalars", "names"} <= raw.keys():
        raise CheckpointError(f"{where}: expected layout, steps, scalars and names")
    try:
        layout = BucketLayout.from_dict(raw["layout"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: bad layout: {error}") from None
    steps, scalars, names = raw["steps"], raw["scalars"], raw["names"]
    count = len(layout.slots)
    if not (isinstance(steps, list) and len(steps) == count and all(isinstance(s, int) and s >= 0 for s in steps)):
        raise CheckpointError(f"{where}: steps must be {count} non-negative integers")
    if not isinstance(scalars, dict) or any(not isinstance(v, list) or len(v) != count for v in scalars.values()):
        raise CheckpointError(f"{where}: scalars must be lists of {count} numbers")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{where}: names must be a list of strings")
    return SourceBucket(layout, steps, scalars, names)


def layouts(buckets: Sequence[SourceBucket]) -> list[BucketLayout]:
    return [bucket.layout for bucket in buckets]
