"""What a tensor file's writer reports and its reader checks against: sizes, offsets, CRCs, digest.

The writer returns a :class:`TensorFileRecord`; the manifest keeps it (``to_dict()`` gives plain
JSON data; where in the manifest it goes is the manifest schema's business); a reader given the
record refuses a file whose size, header or bytes differ. ``from_dict`` treats its input as hostile:
every field is type- and range-checked, with errors naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .digests import parse_digest
from .errors import CheckpointFormatError
from .safetensors_header import SAFETENSORS_DTYPES
from .storage import check_name

MAX_CRC_BLOCK_BYTES = 2**30


@dataclass(frozen=True)
class TensorRecord:
    """One tensor in a file: where its bytes are and their CRC32s.

    ``block_crc32`` holds the CRC of each ``crc_block_bytes`` block of the tensor's bytes (the last
    block may be shorter), so that an element range can be checked by reading the blocks that cover
    it; it is empty when the tensor fits in one block (its one block CRC is then ``crc32``).
    """

    name: str
    dtype: str  # safetensors code: "F32", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file
    nbytes: int
    crc32: int
    block_crc32: tuple[int, ...] = ()

    def block_crcs(self) -> tuple[int, ...]:
        """Every block's CRC, including the one-block case."""
        return self.block_crc32 if self.block_crc32 else ((self.crc32,) if self.nbytes else ())


@dataclass(frozen=True)
class TensorFileRecord:
    """A whole safetensors file as written: name, size, digest, header CRC and its tensors in order."""

    name: str
    size: int
    digest: str  # "crc32:<hex>" or "sha256:<hex>" of the whole file
    header_crc32: int  # CRC32 of the 8-byte length prefix and the JSON header
    crc_block_bytes: int
    tensors: tuple[TensorRecord, ...]

    def tensor(self, name: str) -> TensorRecord:
        for record in self.tensors:
            if record.name == name:
                return record
        raise KeyError(f"{self.name}: no tensor named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (str keys, ints, lists) that :meth:`from_dict` reads back."""
        return {
            "name": self.name,
            "size": self.size,
            "digest": self.digest,
            "header_crc32": self.header_crc32,
            "crc_block_bytes": self.crc_block_bytes,
            "tensors": [
                {
                    "name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
                    "nbytes": t.nbytes, "crc32": t.crc32, **({"block_crc32": list(t.block_crc32)} if t.block_crc32 else {}),
                }
                for t in self.tensors
            ],
        }

    @staticmethod
    def from_dict(data: Any, *, source: str = "tensor file record") -> TensorFileRecord:
        """Check and convert :meth:`to_dict`'s output; ``CheckpointFormatError`` naming the bad field."""
        fields = _fields(data, {"name", "size", "digest", "header_crc32", "crc_block_bytes", "tensors"}, set(), source)
        try:
            name = check_name(fields["name"])
        except (TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"{source}: name: {exc}") from None
        where = f"{source} {name!r}"
        size = _int(fields["size"], f"{where}: size", 0, 2**63)
        parse_digest(fields["digest"], source=f"{where}: digest")
        header_crc32 = _int(fields["header_crc32"], f"{where}: header_crc32", 0, 2**32 - 1)
        block_bytes = _int(fields["crc_block_bytes"], f"{where}: crc_block_bytes", 1, MAX_CRC_BLOCK_BYTES)
        raw_tensors = fields["tensors"]
        if not isinstance(raw_tensors, list):
            raise CheckpointFormatError(f"{where}: tensors must be a list, got {type(raw_tensors).__name__}")
        tensors = tuple(
            _tensor(raw, f"{where}: tensors[{i}]", block_bytes, size) for i, raw in enumerate(raw_tensors)
        )
        if len({t.name for t in tensors}) != len(tensors):
            raise CheckpointFormatError(f"{where}: tensors: duplicate tensor names")
        return TensorFileRecord(name, size, fields["digest"], header_crc32, block_bytes, tensors)


def _fields(data: Any, required: set[str], optional: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise CheckpointFormatError(f"{where}: must be an object, got {type(data).__name__}")
    missing, unknown = required - set(data), set(data) - required - optional
    if missing or unknown:
        raise CheckpointFormatError(f"{where}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)!r:.200}")
    return data


def _int(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise CheckpointFormatError(f"{where}: must be an integer in [{low}, {high}], got {value!r:.80}")
    return value


def _tensor(raw: Any, where: str, block_bytes: int, file_size: int) -> TensorRecord:
    fields = _fields(raw, {"name", "dtype", "shape", "offset", "nbytes", "crc32"}, {"block_crc32"}, where)
    name = fields["name"]
    if not isinstance(name, str) or not name:
        raise CheckpointFormatError(f"{where}: name must be a non-empty str, got {name!r:.80}")
    dtype = fields["dtype"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointFormatError(f"{where}: unknown dtype {dtype!r:.40}")
    shape = fields["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointFormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.100}")
    offset = _int(fields["offset"], f"{where}: offset", 0, file_size)
    nbytes = _int(fields["nbytes"], f"{where}: nbytes", 0, file_size - offset)
    if math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize != nbytes:
        raise CheckpointFormatError(f"{where}: shape {shape} of {dtype} does not have nbytes={nbytes}")
    crc = _int(fields["crc32"], f"{where}: crc32", 0, 2**32 - 1)
    blocks = fields.get("block_crc32", [])
    count = -(-nbytes // block_bytes)
    if not isinstance(blocks, list) or (blocks and len(blocks) != count) or (not blocks and count > 1):
        raise CheckpointFormatError(f"{where}: block_crc32 must list {count} block CRCs, got {blocks!r:.100}")
    for i, block in enumerate(blocks):
        _int(block, f"{where}: block_crc32[{i}]", 0, 2**32 - 1)
    return TensorRecord(name, dtype, tuple(shape), offset, nbytes, crc, tuple(blocks))
