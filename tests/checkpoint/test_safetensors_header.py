"""Hostile safetensors headers are refused, naming the file, before anything they claim is read or allocated."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from shardoptim.checkpoint.errors import CheckpointError, CheckpointFormatError
from shardoptim.checkpoint.safetensors_header import (
    SAFETENSORS_DTYPES, HeaderLimits, encode_header, parse_header,
)
from shardoptim.checkpoint.tensorfile_reader import FIRST_READ_BYTES, TensorFileReader
from shardoptim.checkpoint.tensorfile_writer import write_tensor_file
from tests.checkpoint.conftest import CountingStorage


@pytest.fixture
def storage(tmp_path) -> CountingStorage:
    return CountingStorage(str(tmp_path))


def _file(header: object, data: bytes = b"", *, length: int | None = None, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _refused(storage: CountingStorage, content: bytes, match: str, **kwargs) -> CheckpointFormatError:
    storage.write_bytes("hostile.safetensors", content)
    storage.bytes_read = 0
    with pytest.raises(CheckpointFormatError, match=match) as info:
        TensorFileReader(storage, "hostile.safetensors", expected=None, **kwargs)
    assert "hostile.safetensors" in str(info.value)
    # Nothing past the header was read: at most the first read plus a header within the limit.
    assert storage.bytes_read <= FIRST_READ_BYTES + len(content)
    return info.value


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_huge_header_length_is_refused_without_reading_it(storage):
    _refused(storage, _file({}, length=2**63), "over the limit")
    _refused(storage, _file({}, length=2**24 + 1), "over the limit")


def test_header_longer_than_the_file_is_refused(storage):
    _refused(storage, _file({"a": _entry()}, length=10_000), "past the end")


def test_tiny_files_are_refused(storage):
    _refused(storage, b"\x01\x00", "too short")
    _refused(storage, struct.pack("<Q", 0), "cannot hold")


def test_header_limit_is_configurable(storage):
    content = _file({"a": _entry()}, b"\x00" * 8)
    _refused(storage, content, "over the limit", limits=HeaderLimits(max_header_bytes=10))


def test_header_beyond_the_first_read_is_read_once_and_parsed(storage):
    tensors = {f"t{i:05d}": torch.full((1,), float(i)) for i in range(3000)}  # a ~170 KB header
    record = write_tensor_file(storage, "many.safetensors", tensors)
    reader = TensorFileReader(storage, "many.safetensors", expected=record)
    assert reader.header.data_start > FIRST_READ_BYTES
    assert reader.read("t02999").item() == 2999.0


@pytest.mark.parametrize(
    "header, data, match",
    [
        ({"a": _entry(dtype="F128")}, b"\x00" * 8, "unknown dtype 'F128'"),
        ({"a": _entry(dtype=5)}, b"\x00" * 8, "unknown dtype"),
        ({"a": _entry(shape=(-2,), offsets=(0, 8))}, b"\x00" * 8, "negative size"),
        ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\x00" * 8, "list of integers"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\x00" * 8, "list of integers"),
        ({"a": _entry(shape=[1] * 65, offsets=(0, 4))}, b"\x00" * 4, "over 64 dims"),
        ({"a": _entry(shape=(3,), offsets=(0, 8))}, b"\x00" * 8, "is 12 bytes but data_offsets"),
        ({"a": _entry(shape=(2**40,), offsets=(0, 2**42))}, b"\x00" * 8, "run past"),
        ({"a": _entry(offsets=(8, 16))}, b"\x00" * 8, "leave a gap"),
        ({"a": _entry(offsets=(8, 0))}, b"\x00" * 8, "begin <= end"),
        ({"a": _entry(offsets=(0, 8, 16))}, b"\x00" * 8, "begin <= end"),
        ({"a": _entry(offsets=(-8, 0))}, b"\x00" * 8, "begin <= end"),
        ({"a": _entry(), "b": _entry(offsets=(4, 12))}, b"\x00" * 12, "overlap"),
        ({"a": _entry(), "b": _entry(offsets=(0, 8))}, b"\x00" * 8, "overlap"),
        ({"a": _entry()}, b"\x00" * 12, "the data section has 12 bytes but the tensors cover 8"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\x00" * 8, "entry keys"),
        ({"a": {**_entry(), "extra": 1}}, b"\x00" * 8, "entry keys"),
        ({"a": [1, 2]}, b"", "must be an object"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map str to str"),
        ({"__metadata__": ["k"]}, b"", "__metadata__ must map str to str"),
        ([1, 2], b"", "does not start with"),
    ],
)
def test_invalid_entries_are_refused(storage, header, data, match):
    _refused(storage, _file(header, data), match)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "duplicate key 'a'"),
        (b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "duplicate key 'dtype'"),
        (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "NaN is not allowed"),
        (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}', "invalid header JSON"),
        (b"{" + b'"a": [' * 100_000, "nested 100001 deep"),
        (b'{"a": {"b": {"c": []}}}', "nested 4 deep"),
        (b'{"a": "\xff\xfe"}', "not UTF-8"),
        (b'{"a": ', "invalid header JSON"),
        (b"  {}", "does not start with"),
    ],
)
def test_malformed_json_is_refused(storage, raw, match):
    _refused(storage, _file(None, b"\x00" * 8, raw=raw), match)


def test_a_claimed_terabyte_tensor_is_refused_before_allocation(storage):
    # If the reader trusted the header it would try to allocate 4 TiB; it must refuse with our error.
    _refused(storage, _file({"a": _entry(shape=(2**40,), offsets=(0, 2**42))}, b"\x00" * 64), "run past")


def test_encode_header_is_valid_and_aligned():
    header, entries = encode_header([("x", torch.float32, (2, 3)), ("y", torch.uint8, ()), ("z", torch.float64, (0,))], {"k": "v"})
    assert len(header) % 8 == 0
    parsed = parse_header(header[8:], file_size=len(header) + 25, source="f")
    assert [(e.name, e.begin, e.end) for e in parsed.tensors] == [("x", 0, 24), ("y", 24, 25), ("z", 25, 25)]
    assert parsed.metadata == {"k": "v"} and [e.begin for e in entries] == [0, 24, 25]


def test_encode_header_refuses_bad_input():
    with pytest.raises(TypeError, match="complex128.*view_as_real"):
        encode_header([("c", torch.complex128, (2,))])
    with pytest.raises(ValueError, match="reserved or used twice"):
        encode_header([("__metadata__", torch.float32, (1,))])
    with pytest.raises(ValueError, match="non-empty"):
        encode_header([("", torch.float32, (1,))])
    with pytest.raises(TypeError, match="__metadata__"):
        encode_header([], {"k": 1})


def test_every_known_dtype_parses():
    entries = [(code, dtype, (3,)) for code, dtype in SAFETENSORS_DTYPES.items()]
    header, placed = encode_header(entries)
    parsed = parse_header(header[8:], file_size=len(header) + placed[-1].end, source="f")
    assert [e.dtype for e in parsed.tensors] == list(SAFETENSORS_DTYPES.values())


def test_fuzzed_headers_are_refused_cleanly_or_parse(storage):
    # Byte flips, truncations and numeric extremes in a real header: the only acceptable outcomes
    # are a clean refusal (CheckpointError) or a header that still validates against the file.
    tensors = {"exp_avg": torch.randn(5, 3), "step": torch.tensor(3), "mask": torch.ones(4, dtype=torch.bool)}
    write_tensor_file(storage, "real.safetensors", tensors, metadata={"format": "shardoptim"})
    original = storage.read_bytes("real.safetensors")
    length = struct.unpack("<Q", original[:8])[0]
    rng = random.Random(12)
    extremes = [b"-1", b"18446744073709551616", b"1e308", b"99999999999", b"null", b'"x"', b"[]", b"{}", b"true"]
    for case in range(300):
        content = bytearray(original)
        kind = case % 3
        if kind == 0:
            for _ in range(rng.randrange(1, 4)):
                content[rng.randrange(0, 8 + length)] = rng.randrange(256)
        elif kind == 1:
            content = content[: rng.randrange(0, len(content))]
        else:
            text = bytes(content[8 : 8 + length])
            digits = [i for i, c in enumerate(text) if chr(c).isdigit()]
            at = rng.choice(digits)
            text = text[:at] + rng.choice(extremes) + text[at + 1 :]
            content = bytearray(struct.pack("<Q", len(text)) + text + original[8 + length :])
        storage.write_bytes("fuzz.safetensors", bytes(content))
        try:
            reader = TensorFileReader(storage, "fuzz.safetensors", expected=None)
        except CheckpointError:
            continue
        for name in reader.names:
            reader.read(name)  # a header that passed validation never leads outside the file
