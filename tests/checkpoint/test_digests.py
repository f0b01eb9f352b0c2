"""CRC32 combination, block CRCs and file digests against zlib and hashlib."""

from __future__ import annotations

import hashlib
import os
import random
import zlib

import pytest

from shardoptim.checkpoint.digests import BlockCrc32, FileHasher, crc32_combine, parse_digest
from shardoptim.checkpoint.errors import CheckpointFormatError


def test_crc32_combine_matches_zlib_on_the_concatenation():
    rng = random.Random(0)
    for _ in range(300):
        a, b = os.urandom(rng.randrange(0, 5000)), os.urandom(rng.randrange(0, 5000))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    big = os.urandom(3 * 2**20 + 17)
    assert crc32_combine(zlib.crc32(b"head"), zlib.crc32(big), len(big)) == zlib.crc32(b"head" + big)


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_block_crcs_for_pieces_of_any_size(block):
    rng = random.Random(block)
    data = os.urandom(10_000)
    blocks = BlockCrc32(block)
    position = 0
    while position < len(data):
        step = rng.randrange(1, 3 * block + 2)
        blocks.update(data[position : position + step])
        position += step
    expected = [zlib.crc32(data[i : i + block]) for i in range(0, len(data), block)]
    assert blocks.finish() == expected
    assert blocks.crc32() == zlib.crc32(data)


def test_empty_stream_has_no_blocks_and_crc_zero():
    blocks = BlockCrc32(16)
    assert blocks.finish() == [] and blocks.crc32() == 0


def test_file_hasher_digests():
    data = os.urandom(100_000)
    crc = FileHasher("crc32")
    crc.update(data[:10])
    crc.update_crc(zlib.crc32(data[10:]), len(data) - 10)
    assert crc.digest() == f"crc32:{zlib.crc32(data):08x}"
    sha = FileHasher("sha256")
    sha.update(data)
    assert sha.digest() == "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="sha256 must see the bytes"):
        sha.update_crc(0, 1)
    with pytest.raises(ValueError, match="md5"):
        FileHasher("md5")


def test_parse_digest():
    assert parse_digest("crc32:0badf00d") == ("crc32", "0badf00d")
    assert parse_digest("sha256:" + "a" * 64) == ("sha256", "a" * 64)
    for bad in ["crc32:0BADF00D", "crc32:123", "md5:" + "a" * 32, "sha256:" + "a" * 63, 5, None, "crc32:0badf00d "]:
        with pytest.raises(CheckpointFormatError, match="x.safetensors"):
            parse_digest(bad, source="x.safetensors")


def test_the_crc32_in_use_is_zlibs():
    # digests.crc32 may be zlib-ng's where installed: it must give zlib's values.
    from shardoptim.checkpoint.digests import crc32

    for size in (0, 1, 5000, 2**20 + 3):
        data = os.urandom(size)
        assert crc32(data) == zlib.crc32(data) and crc32(data, 12345) == zlib.crc32(data, 12345)
