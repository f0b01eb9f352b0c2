"""The safetensors header: encoded from names, dtypes and shapes alone; parsed strictly.

A safetensors file is ``u64 little-endian N`` + ``N bytes of JSON`` + the data section. The JSON maps
each tensor name to ``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}`` (offsets
into the data section) and may hold ``"__metadata__": {str: str}``. This module writes that format
from its specification (no code of the safetensors package) and reads it as a hostile-input parser:
everything is checked against the file's real size before a caller allocates anything a header
claims, so a forged shape or offset cannot make the reader allocate more than the file holds.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import CheckpointFormatError
from .json_codec import json_nesting_depth

HEADER_PREFIX_BYTES = 8
METADATA_KEY = "__metadata__"
HEADER_ALIGNMENT = 8  # the JSON is padded with spaces so the data section starts 8-byte aligned


def _dtype_table() -> dict[str, torch.dtype]:
    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
        "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64",
        "F64": "float64", "I64": "int64", "U64": "uint64", "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    }
    return {code: getattr(torch, name) for code, name in names.items() if hasattr(torch, name)}


#: safetensors dtype code -> torch dtype, for every dtype that both torch and safetensors know.
#: complex128 and complex32 are not among them: store ``torch.view_as_real(t)`` and say so in the
#: manifest.
SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = _dtype_table()
DTYPE_CODES: Mapping[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class HeaderLimits:
    """Bounds on what :func:`parse_header` accepts from a file it does not trust."""

    max_header_bytes: int = 16 * 2**20
    """Largest JSON header accepted (safetensors itself stops at 100 MB)."""
    max_ndim: int = 64
    """Most dimensions a tensor may claim."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header; ``begin``/``end`` are offsets into the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed and validated header: tensors in data-section order, metadata, and where data starts."""

    tensors: tuple[TensorEntry, ...]
    metadata: Mapping[str, str]
    data_start: int  # absolute file offset of the data section: 8 + N

    def entry(self, name: str, *, source: str = "file") -> TensorEntry:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        raise KeyError(f"{source}: no tensor named {name!r}")


def dtype_code(dtype: torch.dtype, *, name: str = "tensor") -> str:
    """The safetensors code of ``dtype``; ``TypeError`` naming the tensor if safetensors lacks it."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        hint = " (store torch.view_as_real(t) instead)" if dtype.is_complex else ""
        raise TypeError(
            f"{name}: dtype {dtype} has no safetensors code{hint}; supported: {sorted(map(str, DTYPE_CODES))}"
        ) from None


def encode_header(
    entries: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, tuple[TensorEntry, ...]]:
    """Header bytes (8-byte length prefix included) for tensors laid out back to back in this order.

    Returns the bytes and the entries with their data-section offsets. Depends on names, dtypes and
    shapes only, so it is written before any tensor byte is read.
    """
    header: dict[str, object] = {}
    if metadata:
        for key, value in metadata.items():
            if type(key) is not str or type(value) is not str:
                raise TypeError(f"__metadata__ must map str to str, got {key!r:.80}: {type(value).__name__}")
        header[METADATA_KEY] = dict(metadata)
    placed = []
    offset = 0
    for name, dtype, shape in entries:
        if type(name) is not str or not name:
            raise ValueError(f"tensor names must be non-empty str, got {name!r:.80}")
        if name == METADATA_KEY or name in header:
            raise ValueError(f"tensor name {name!r} is reserved or used twice")
        code = dtype_code(dtype, name=name)
        dims = tuple(int(d) for d in shape)
        nbytes = math.prod(dims) * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        placed.append(TensorEntry(name, dtype, dims, offset, offset + nbytes))
        offset += nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text, tuple(placed)


def header_length(prefix: bytes, *, file_size: int, source: str, limits: HeaderLimits = HeaderLimits()) -> int:
    """The JSON length N from a file's first 8 bytes, bounded by the limit and the file's size."""
    if file_size < HEADER_PREFIX_BYTES or len(prefix) < HEADER_PREFIX_BYTES:
        raise CheckpointFormatError(f"{source}: {file_size} bytes is too short for a safetensors file")
    (length,) = struct.unpack("<Q", prefix[:HEADER_PREFIX_BYTES])
    if length > limits.max_header_bytes:
        raise CheckpointFormatError(
            f"{source}: header length {length} is over the limit of {limits.max_header_bytes} bytes"
        )
    if length > file_size - HEADER_PREFIX_BYTES:
        raise CheckpointFormatError(
            f"{source}: header length {length} runs past the end of the {file_size}-byte file (truncated?)"
        )
    if length < 2:
        raise CheckpointFormatError(f"{source}: header length {length} cannot hold a JSON object")
    return length


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a header")


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r:.80}")
        result[key] = value
    return result


def _int_list(value: object, field: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise CheckpointFormatError(f"{where}: {field} must be a list of integers, got {value!r:.100}")
    return value


def _entry(name: str, spec: object, where: str, limits: HeaderLimits) -> TensorEntry:
    if not isinstance(spec, dict):
        raise CheckpointFormatError(f"{where}: entry must be an object, got {type(spec).__name__}")
    if set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointFormatError(
            f"{where}: entry keys must be dtype, shape, data_offsets; got {sorted(spec)!r:.200}"
        )
    code = spec["dtype"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise CheckpointFormatError(f"{where}: unknown dtype {code!r:.40}; known: {sorted(SAFETENSORS_DTYPES)}")
    shape = _int_list(spec["shape"], "shape", where)
    if len(shape) > limits.max_ndim or any(d < 0 for d in shape):
        raise CheckpointFormatError(f"{where}: shape {shape!r:.200} has a negative size or over {limits.max_ndim} dims")
    offsets = _int_list(spec["data_offsets"], "data_offsets", where)
    if len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise CheckpointFormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.100}")
    dtype = SAFETENSORS_DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a forged shape cannot overflow
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointFormatError(
            f"{where}: shape {shape} of {code} is {nbytes} bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def parse_header(
    json_bytes: bytes, *, file_size: int, source: str, limits: HeaderLimits = HeaderLimits()
) -> Header:
    """Validate a header's JSON (the N bytes after the length prefix) against the file's size.

    Refuses, with :class:`CheckpointFormatError` naming ``source`` and the tensor: JSON that is not
    an object, nested deeper than a header can be, with duplicate keys or non-standard constants;
    metadata other than str -> str; unknown dtypes; shapes whose byte size differs from their
    offsets; offsets past the end of the file, overlapping, or leaving gaps or trailing bytes (the
    data section must be exactly covered, as safetensors requires).
    """
    data_start = HEADER_PREFIX_BYTES + len(json_bytes)
    try:
        text = json_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointFormatError(f"{source}: header is not UTF-8 ({exc})") from None
    if not text.startswith("{"):
        raise CheckpointFormatError(f"{source}: header does not start with '{{': {text[:40]!r}")
    depth = json_nesting_depth(text)
    if depth > 3:  # {name: {"shape": [..]}} is as deep as a header goes
        raise CheckpointFormatError(f"{source}: header JSON nested {depth} deep; a safetensors header has 3 levels")
    try:
        raw = json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_reject_constant)
    except ValueError as exc:
        raise CheckpointFormatError(f"{source}: invalid header JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{source}: header must be a JSON object, got {type(raw).__name__}")
    metadata = raw.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(f"{source}: {METADATA_KEY} must map str to str, got {metadata!r:.200}")
    entries = [_entry(name, spec, f"{source}: tensor {name!r:.200}", limits) for name, spec in raw.items()]
    data_size = file_size - data_start
    position = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        where = f"{source}: tensor {entry.name!r:.200}"
        if entry.begin < position:
            raise CheckpointFormatError(f"{where}: data_offsets [{entry.begin}, {entry.end}] overlap the previous tensor (ends at {position})")
        if entry.begin > position:
            raise CheckpointFormatError(f"{where}: data_offsets [{entry.begin}, {entry.end}] leave a gap after offset {position}")
        if entry.end > data_size:
            raise CheckpointFormatError(
                f"{where}: data_offsets [{entry.begin}, {entry.end}] run past the {data_size}-byte data section (truncated?)"
            )
        position = entry.end
    if position != data_size:
        raise CheckpointFormatError(f"{source}: the data section has {data_size} bytes but the tensors cover {position}")
    ordered = tuple(sorted(entries, key=lambda e: (e.begin, e.end)))
    return Header(ordered, dict(metadata), data_start)
