"""Streaming safetensors writer and checked reader on local disk, memory:// and S3."""

from __future__ import annotations

import io
import json
import os
import random
import time

import pytest
import safetensors.torch
import torch

from shardoptim.checkpoint.errors import CheckpointError, CheckpointFormatError, CheckpointIntegrityError
from shardoptim.checkpoint.json_codec import decode_json, encode_json
from shardoptim.checkpoint.safetensors_header import SAFETENSORS_DTYPES
from shardoptim.checkpoint.storage import Storage
from shardoptim.checkpoint.tensor_bytes import byte_view, tensor_pieces
from shardoptim.checkpoint.tensorfile_reader import TensorFileReader
from shardoptim.checkpoint.tensorfile_record import TensorFileRecord
from shardoptim.checkpoint.tensorfile_writer import stream_tensor_file, write_tensor_file
from tests.checkpoint.kill_writer import crash_tensors
from tests.checkpoint.conftest import CountingStorage
from tests.checkpoint.writer_process import kill, start_writer, wait_for_line


@pytest.fixture
def storage(storage_root) -> Storage:
    url, options = storage_root
    return Storage(url, options)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs and float8 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(byte_view(a.resolve_conj().resolve_neg().contiguous())) == bytes(byte_view(b.resolve_conj().resolve_neg().contiguous()))


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).mul_(3).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int64).to(dtype)


def _every_dtype() -> dict[str, torch.Tensor]:
    tensors = {f"{code}": _sample(dtype, (3, 5), i) for i, (code, dtype) in enumerate(SAFETENSORS_DTYPES.items())}
    tensors["F32_nan_inf"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    return tensors


def _odd_shapes() -> dict[str, torch.Tensor]:
    base = torch.randn(6, 8)
    complex_base = torch.randn(4, 3, dtype=torch.complex64)
    return {
        "scalar": torch.tensor(2.5),
        "scalar_int": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0),
        "empty_2d": torch.empty(3, 0, 2, dtype=torch.float16),
        "odd_bytes": torch.arange(7, dtype=torch.uint8),
        "after_odd": torch.randn(3, dtype=torch.float64),  # unaligned in the data section
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.randn(3, 1).expand(3, 4),
        "conj_view": complex_base.conj(),
        "neg_view": torch.randn(5, dtype=torch.complex64).conj().imag,  # a view with the negative bit
        "param": torch.nn.Parameter(torch.randn(4, 4)),
        "bf16_transposed": torch.randn(5, 7).to(torch.bfloat16).t(),
        "big_dims": torch.randn(1, 1, 2, 1, 3, 1),
    }


def test_every_dtype_round_trips_and_safetensors_reads_it(storage):
    tensors = _every_dtype()
    record = write_tensor_file(storage, "all.safetensors", tensors, metadata={"format": "shardoptim", "rank": "0"})
    reader = TensorFileReader(storage, "all.safetensors", expected=record)
    assert reader.names == list(tensors) and reader.metadata == {"format": "shardoptim", "rank": "0"}
    for name, tensor in tensors.items():
        assert _same(reader.read(name), tensor), name
    reader.verify()
    loaded = safetensors.torch.load(storage.read_bytes("all.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert _same(loaded[name], tensor), name


def test_odd_shapes_and_layouts_round_trip(storage):
    tensors = _odd_shapes()
    assert tensors["neg_view"].is_neg() and tensors["conj_view"].is_conj() and not tensors["strided"].is_contiguous()
    record = write_tensor_file(storage, "odd.safetensors", tensors)
    reader = TensorFileReader(storage, "odd.safetensors", expected=record)
    for name, tensor in tensors.items():
        got = reader.read(name)
        assert _same(got, tensor.detach()) and got.is_contiguous() and not got.requires_grad, name


def test_safetensors_load_file_reads_what_we_write(tmp_path):
    storage = Storage(str(tmp_path))
    tensors = {**_every_dtype(), **_odd_shapes()}
    write_tensor_file(storage, "f.safetensors", tensors, metadata={"k": "v"})
    loaded = safetensors.torch.load_file(str(tmp_path / "f.safetensors"))
    for name, tensor in tensors.items():
        assert _same(loaded[name], tensor.detach()), name
    with safetensors.safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_what_safetensors_writes_we_read(tmp_path):
    tensors = {"a": torch.randn(4, 4), "b": torch.arange(5, dtype=torch.int32), "c": torch.tensor(True)}
    safetensors.torch.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"m": "1"})
    reader = TensorFileReader(Storage(str(tmp_path)), "theirs.safetensors", expected=None)
    assert reader.metadata == {"m": "1"}
    for name, tensor in tensors.items():
        assert _same(reader.read(name), tensor)


def test_unsupported_tensors_are_refused_before_writing(storage):
    for bad, match in [
        ({"c": torch.zeros(2, dtype=torch.complex128)}, "complex128.*view_as_real"),
        ({"s": torch.zeros(3, 3).to_sparse()}, "dense"),
        ({"m": torch.zeros(3, device="meta")}, "dense"),
        ({"x": [1, 2]}, "torch.Tensor"),
    ]:
        with pytest.raises(TypeError, match=match):
            write_tensor_file(storage, "bad.safetensors", bad)
    assert not storage.exists("bad.safetensors")


class _RecordingFile(io.RawIOBase):
    """A write-only file that keeps what it is given and the largest single write."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.largest = 0

    def writable(self) -> bool:
        return True

    def write(self, piece) -> int:
        piece = memoryview(piece).cast("B")
        self.largest = max(self.largest, len(piece))
        self.data += piece
        return len(piece)


@pytest.mark.parametrize("make", [lambda: torch.randn(1024, 2048), lambda: torch.randn(2048, 1024).t(), lambda: torch.randn(4, 512, 1024).transpose(0, 2)])
def test_streaming_writes_bounded_pieces(make):
    tensor = make()  # 8 MiB
    piece = 2**18
    assert all(len(p) <= piece for p in tensor_pieces(tensor, piece))
    f = _RecordingFile()
    record = stream_tensor_file(f, {"t": tensor}, name="t.safetensors", piece_bytes=piece, crc_block_bytes=2**16)
    header_bytes = record.tensors[0].offset
    assert f.largest <= max(piece, header_bytes)
    assert _same(safetensors.torch.load(bytes(f.data))["t"], tensor)
    assert len(record.tensors[0].block_crc32) == 8 * 2**20 // 2**16


def test_element_ranges_match_the_full_read(storage):
    rng = random.Random(3)
    tensors = {"f32": torch.randn(37, 11), "bf16": torch.randn(301).to(torch.bfloat16), "u8": torch.arange(250, dtype=torch.uint8), "tiny": torch.tensor([1.0])}
    # 100-byte CRC blocks: ranges start and end inside blocks, and blocks split elements.
    record = write_tensor_file(storage, "r.safetensors", tensors, crc_block_bytes=100)
    for expected in (record, None):
        reader = TensorFileReader(storage, "r.safetensors", expected=expected)
        for name, tensor in tensors.items():
            flat = tensor.reshape(-1)
            cases = [(0, flat.numel()), (0, 0), (flat.numel(), flat.numel()), (0, 1), (flat.numel() - 1, flat.numel())]
            cases += [tuple(sorted(rng.sample(range(flat.numel() + 1), 2))) for _ in range(15) if flat.numel() > 1]
            for start, stop in cases:
                assert _same(reader.read_range(name, start, stop), flat[start:stop]), (name, start, stop)
        with pytest.raises(ValueError, match="element range"):
            reader.read_range("f32", 5, 4)
        with pytest.raises(ValueError, match="element range"):
            reader.read_range("f32", 0, 37 * 11 + 1)
        with pytest.raises(KeyError, match="nope"):
            reader.read("nope")


def test_a_range_reads_only_its_blocks(tmp_path):
    storage = CountingStorage(str(tmp_path))
    tensor = torch.randn(2**20)  # 4 MiB
    block = 2**16
    record = write_tensor_file(storage, "r.safetensors", {"flat": tensor}, crc_block_bytes=block)
    reader = TensorFileReader(storage, "r.safetensors", expected=record)
    storage.bytes_read = 0
    got = reader.read_range("flat", 100_001, 200_003)
    assert torch.equal(got, tensor[100_001:200_003])
    wanted = (200_003 - 100_001) * 4
    assert wanted <= storage.bytes_read <= wanted + 2 * block


def test_reads_are_fresh_memory(storage):
    tensor = torch.arange(10.0)
    record = write_tensor_file(storage, "f.safetensors", {"t": tensor})
    reader = TensorFileReader(storage, "f.safetensors", expected=record)
    first, second = reader.read("t"), reader.read("t")
    first.add_(100)
    assert torch.equal(second, tensor) and torch.equal(reader.read("t"), tensor)
    assert torch.equal(tensor, torch.arange(10.0))


def _flip(storage: Storage, name: str, offset: int) -> None:
    content = bytearray(storage.read_bytes(name))
    content[offset] ^= 0x01
    storage.write_bytes(name, bytes(content))


def test_a_flipped_data_byte_is_caught_naming_file_and_tensor(storage):
    tensors = {"clean": torch.randn(1000), "damaged": torch.randn(1000)}
    record = write_tensor_file(storage, "f.safetensors", tensors, crc_block_bytes=1000)
    damaged = record.tensor("damaged")
    _flip(storage, "f.safetensors", damaged.offset + 2500)  # inside block 2 of 4
    reader = TensorFileReader(storage, "f.safetensors", expected=record)
    assert _same(reader.read("clean"), tensors["clean"])
    with pytest.raises(CheckpointIntegrityError, match=r"f\.safetensors: tensor 'damaged': CRC32 mismatch in its bytes \[2000, 3000\)"):
        reader.read("damaged")
    with pytest.raises(CheckpointIntegrityError, match="damaged"):
        reader.read_range("damaged", 600, 700)  # elements 600..700 are bytes 2400..2800
    assert _same(reader.read_range("damaged", 0, 500), tensors["damaged"][:500])  # blocks 0 and 1 are intact
    with pytest.raises(CheckpointIntegrityError, match="digest"):
        reader.verify()
    unchecked = TensorFileReader(storage, "f.safetensors", expected=None)
    assert not _same(unchecked.read("damaged"), tensors["damaged"])  # what the CRC protects against


def test_views_are_checked_like_reads(storage):
    tensors = {"clean": torch.randn(1000), "damaged": torch.randn(1000)}
    record = write_tensor_file(storage, "f.safetensors", tensors, crc_block_bytes=1000)
    reader = TensorFileReader(storage, "f.safetensors", expected=record)
    assert _same(reader.view_range("damaged", 0, 1000), tensors["damaged"])
    _flip(storage, "f.safetensors", record.tensor("damaged").offset + 2500)
    reader = TensorFileReader(storage, "f.safetensors", expected=record)
    assert _same(reader.view_range("clean", 10, 990), tensors["clean"][10:990])
    assert _same(reader.view_range("damaged", 0, 500), tensors["damaged"][:500])
    for start, stop in [(0, 1000), (600, 700), (499, 501)]:
        with pytest.raises(CheckpointIntegrityError, match=r"f\.safetensors: tensor 'damaged': CRC32 mismatch in its bytes \[2000, 3000\)"):
            reader.view_range("damaged", start, stop)
    assert reader.view_range("damaged", 7, 7).numel() == 0
    with pytest.raises(ValueError, match=r"element range \[5, 1001\)"):
        reader.view_range("damaged", 5, 1001)


def test_a_view_written_to_leaves_the_file_as_it_was(storage):
    tensor = torch.arange(10.0)
    record = write_tensor_file(storage, "f.safetensors", {"t": tensor})
    reader = TensorFileReader(storage, "f.safetensors", expected=record)
    reader.view_range("t", 0, 10).add_(100)  # against the contract; a local map is private all the same
    assert _same(TensorFileReader(storage, "f.safetensors", expected=record).read("t"), tensor)


@pytest.mark.parametrize("digest", ["crc32", "sha256"])
def test_verify_detects_any_flipped_byte(tmp_path, digest):
    storage = Storage(str(tmp_path))
    record = write_tensor_file(storage, "f.safetensors", {"a": torch.randn(100), "b": torch.randn(3)}, digest=digest)
    assert record.digest.startswith(digest + ":")
    TensorFileReader(storage, "f.safetensors", expected=record).verify()
    content = storage.read_bytes("f.safetensors")
    for offset in random.Random(0).sample(range(record.tensors[0].offset, len(content)), 10):
        _flip(storage, "f.safetensors", offset)
        with pytest.raises(CheckpointIntegrityError, match="f.safetensors"):
            TensorFileReader(storage, "f.safetensors", expected=record).verify()
        storage.write_bytes("f.safetensors", content)


def test_a_flipped_header_byte_is_caught_at_open(storage):
    record = write_tensor_file(storage, "f.safetensors", {"weight": torch.randn(10)}, metadata={"note": "abc"})
    header = storage.read_bytes("f.safetensors", 0, record.tensors[0].offset)
    _flip(storage, "f.safetensors", header.index(b"abc"))
    with pytest.raises(CheckpointIntegrityError, match="header CRC32"):
        TensorFileReader(storage, "f.safetensors", expected=record)


def test_truncated_or_extended_files_are_refused(storage):
    record = write_tensor_file(storage, "f.safetensors", {"a": torch.randn(100)})
    content = storage.read_bytes("f.safetensors")
    storage.write_bytes("f.safetensors", content[:-1])
    with pytest.raises(CheckpointIntegrityError, match="truncated or replaced"):
        TensorFileReader(storage, "f.safetensors", expected=record)
    with pytest.raises(CheckpointFormatError, match="run past"):
        TensorFileReader(storage, "f.safetensors", expected=None)
    storage.write_bytes("f.safetensors", content + b"\x00")
    with pytest.raises(CheckpointIntegrityError, match="truncated or replaced"):
        TensorFileReader(storage, "f.safetensors", expected=record)


def test_a_record_that_disagrees_with_the_header_is_refused(tmp_path):
    storage = Storage(str(tmp_path))
    record = write_tensor_file(storage, "f.safetensors", {"a": torch.randn(4), "b": torch.randn(4)})
    data = record.to_dict()
    data["tensors"][0]["name"], data["tensors"][1]["name"] = "b", "a"  # swapped by position
    with pytest.raises(CheckpointFormatError, match="does not match the file's record"):
        TensorFileReader(storage, "f.safetensors", expected=TensorFileRecord.from_dict(data))


def test_exclusive_tensor_file_refuses_to_overwrite(storage):
    write_tensor_file(storage, "f.safetensors", {"a": torch.zeros(2)}, exclusive=True)
    with pytest.raises(FileExistsError):
        write_tensor_file(storage, "f.safetensors", {"a": torch.ones(2)}, exclusive=True)
    assert torch.equal(TensorFileReader(storage, "f.safetensors", expected=None).read("a"), torch.zeros(2))


def test_record_round_trips_through_manifest_json(tmp_path):
    storage = Storage(str(tmp_path))
    record = write_tensor_file(storage, "f.safetensors", {"a": torch.randn(1000), "b": torch.tensor(1)}, crc_block_bytes=512)
    back = TensorFileRecord.from_dict(decode_json(encode_json(record.to_dict())))
    assert back == record
    TensorFileReader(storage, "f.safetensors", expected=back).verify()


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("name",), "../escape.safetensors", "unsafe file name"),
        (("name",), "s3://other/bucket", "unsafe file name"),
        (("size",), -1, "size"),
        (("size",), True, "size"),
        (("digest",), "md5:abc", "digest"),
        (("header_crc32",), 2**32, "header_crc32"),
        (("crc_block_bytes",), 0, "crc_block_bytes"),
        (("crc_block_bytes",), 2**40, "crc_block_bytes"),
        (("tensors",), {}, "tensors must be a list"),
        (("tensors", 0, "dtype"), "F128", "unknown dtype"),
        (("tensors", 0, "shape"), [2**40], "does not have nbytes"),
        (("tensors", 0, "offset"), 2**50, "offset"),
        (("tensors", 0, "nbytes"), 2**50, "nbytes"),
        (("tensors", 0, "crc32"), -1, "crc32"),
        (("tensors", 0, "block_crc32"), [1, 2], "block CRCs"),
        (("tensors", 0, "extra"), 1, "unknown fields"),
        (("extra",), 1, "unknown fields"),
    ],
)
def test_hostile_records_are_refused(tmp_path, path, value, match):
    record = write_tensor_file(Storage(str(tmp_path)), "f.safetensors", {"a": torch.randn(100)}, crc_block_bytes=128)
    data = json.loads(json.dumps(record.to_dict()))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(CheckpointFormatError, match=match):
        TensorFileRecord.from_dict(data, source="MANIFEST.json files[0]")


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_sigkill_at_random_points_leaves_no_file_or_a_complete_one(storage):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    outcomes = []
    for trial in range(3):
        name = f"trial{trial}.safetensors"
        process = start_writer({"url": storage.url, "storage_options": storage.storage_options, "name": name, "mode": "tensorfile", "seed": trial})
        wait_for_line(process, "started")
        time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is None:
            kill(process)
        else:
            assert process.returncode == 0, process.communicate()[1][-2000:]
        if storage.exists(name):
            reader = TensorFileReader(storage, name, expected=None)
            for key, tensor in crash_tensors(trial).items():
                assert _same(reader.read(key), tensor)
            outcomes.append("complete")
        else:
            outcomes.append("absent")
    assert len(outcomes) == 3


def test_reader_errors_are_checkpoint_errors_and_value_errors():
    assert issubclass(CheckpointIntegrityError, CheckpointError) and issubclass(CheckpointError, ValueError)


def test_an_empty_mapping_is_a_valid_file(storage):
    record = write_tensor_file(storage, "empty.safetensors", {}, metadata={"note": "nothing"})
    assert safetensors.torch.load(storage.read_bytes("empty.safetensors")) == {}
    reader = TensorFileReader(storage, "empty.safetensors", expected=record)
    assert reader.names == [] and reader.metadata == {"note": "nothing"}
    reader.verify()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_written_a_piece_at_a_time():
    tensors = {"flat": torch.randn(3 * 2**20, device="cuda"), "transposed": torch.randn(512, 1024, device="cuda").t()}
    f = _RecordingFile()
    record = stream_tensor_file(f, tensors, name="gpu.safetensors", piece_bytes=2**20)
    assert f.largest <= max(2**20, record.tensors[0].offset)
    loaded = safetensors.torch.load(bytes(f.data))
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.cpu())
