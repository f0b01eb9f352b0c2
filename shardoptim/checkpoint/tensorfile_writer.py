"""Streaming safetensors writer: header first, then each tensor's bytes in bounded pieces.

The header depends only on names, dtypes and shapes, so it goes out first; the tensors' bytes follow
in the mapping's order, back to back, in pieces of ``piece_bytes`` (the extra memory is O(piece),
not O(tensor): a contiguous CPU tensor is written straight from its memory). As the bytes go by,
each ``crc_block_bytes`` block gets a CRC32 (on a helper thread, overlapping the write), from which
the tensor's CRC and, with the header's, the file's CRC32 digest are combined; a sha256 file digest,
when asked for, runs on the helper thread instead and the CRCs after each write. The result is a valid safetensors file
(``safetensors.torch.load_file`` reads it) and a :class:`TensorFileRecord` for the manifest.

Supported dtypes: every one both torch and safetensors know (``SAFETENSORS_DTYPES``): bool,
(u)int8/16/32/64, float16, bfloat16, float32, float64, complex64 and the float8 formats. complex128
and complex32 have no safetensors code: pass ``torch.view_as_real(t)`` and record that yourself.
Tensors may be non-contiguous, 0-d, empty, conjugate views, or on an accelerator (copied a piece at
a time). Sparse, quantized and meta tensors are refused.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import torch

from .digests import BlockCrc32, FileHasher, crc32
from .safetensors_header import dtype_code, encode_header
from .storage import Storage
from .tensor_bytes import tensor_pieces
from .tensorfile_record import MAX_CRC_BLOCK_BYTES, TensorFileRecord, TensorRecord

logger = logging.getLogger(__name__)

DEFAULT_PIECE_BYTES = 8 * 2**20
DEFAULT_CRC_BLOCK_BYTES = 2**20


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to tensors, got {type(tensors).__name__}")
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
            raise TypeError(f"tensor {name!r}: only dense (strided) tensors with data can be saved, got layout "
                            f"{tensor.layout}, device {tensor.device}{', quantized' if tensor.is_quantized else ''}")
        dtype_code(tensor.dtype, name=f"tensor {name!r}")


class _Hashing:
    """Block CRCs of the current tensor and, when asked for, the sha256 of the file.

    The writer runs ``feed_beside`` on a helper thread while it writes a piece, then ``feed_after``
    itself: the CRC overlaps the write; with sha256 (the slower hash) on the helper, the CRC follows
    the write on the writing thread, so the two hashes run on two cores.
    """

    def __init__(self, block_bytes: int, file_hasher: FileHasher) -> None:
        self.block_bytes = block_bytes
        self.file_hasher = file_hasher
        self.blocks = BlockCrc32(block_bytes)
        self.sha = file_hasher.algorithm != "crc32"

    def feed_beside(self, piece: memoryview) -> None:
        (self.file_hasher if self.sha else self.blocks).update(piece)

    def feed_after(self, piece: memoryview) -> None:
        if self.sha:
            self.blocks.update(piece)

    def finish_tensor(self) -> tuple[int, tuple[int, ...], int]:
        blocks = self.blocks.finish()
        crc, nbytes = self.blocks.crc32(), self.blocks.nbytes
        if not self.sha:
            self.file_hasher.update_crc(crc, nbytes)
        self.blocks = BlockCrc32(self.block_bytes)
        return crc, tuple(blocks) if len(blocks) > 1 else (), nbytes


def stream_tensor_file(
    f: BinaryIO,
    tensors: Mapping[str, torch.Tensor],
    *,
    name: str,
    metadata: Mapping[str, str] | None = None,
    digest: str = "crc32",
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    crc_block_bytes: int = DEFAULT_CRC_BLOCK_BYTES,
) -> TensorFileRecord:
    """Write ``tensors`` as a safetensors file to the open binary file ``f`` (any fsspec file object).

    ``name`` is what the record calls the file. Returns the record: size, digest, header CRC, and each
    tensor's offset and CRCs. Call on one rank; no collective.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors is little-endian; writing from a big-endian machine is not supported")
    if not 0 < crc_block_bytes <= MAX_CRC_BLOCK_BYTES:
        raise ValueError(f"crc_block_bytes must be in (0, {MAX_CRC_BLOCK_BYTES}], got {crc_block_bytes}")
    if piece_bytes <= 0:
        raise ValueError(f"piece_bytes must be > 0, got {piece_bytes}")
    _check_tensors(tensors)
    header, entries = encode_header([(n, t.dtype, t.shape) for n, t in tensors.items()], metadata)
    file_hasher = FileHasher(digest)
    file_hasher.update(header)
    hashing = _Hashing(crc_block_bytes, file_hasher)
    f.write(header)
    records = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardoptim-crc") as pool:
        for entry, tensor in zip(entries, tensors.values()):
            for piece in tensor_pieces(tensor, piece_bytes):
                pending = pool.submit(hashing.feed_beside, piece)
                try:
                    f.write(piece)
                    hashing.feed_after(piece)
                finally:
                    pending.result()
            crc, blocks, nbytes = hashing.finish_tensor()
            if nbytes != entry.nbytes:
                raise RuntimeError(f"tensor {entry.name!r}: wrote {nbytes} bytes, header says {entry.nbytes}")
            records.append(
                TensorRecord(entry.name, dtype_code(entry.dtype), entry.shape, len(header) + entry.begin, nbytes, crc, blocks)
            )
    size = len(header) + (entries[-1].end if entries else 0)
    logger.debug("wrote %s: %d tensors, %d bytes", name, len(records), size)
    return TensorFileRecord(name, size, file_hasher.digest(), crc32(header), crc_block_bytes, tuple(records))


def write_tensor_file(
    storage: Storage,
    name: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    exclusive: bool = False,
    digest: str = "crc32",
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    crc_block_bytes: int = DEFAULT_CRC_BLOCK_BYTES,
) -> TensorFileRecord:
    """Write ``tensors`` to ``storage``'s ``name`` so that the file appears only complete and durable.

    ``exclusive=True`` makes it a create-only write (``FileExistsError`` if ``name`` exists). On any
    error nothing appears under ``name``. See :func:`stream_tensor_file` for the rest.
    """
    with storage.open_write(name, exclusive=exclusive) as f:
        return stream_tensor_file(
            f, tensors, name=name, metadata=metadata, digest=digest, piece_bytes=piece_bytes, crc_block_bytes=crc_block_bytes
        )
