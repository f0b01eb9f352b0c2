"""Checked reads from safetensors files: strict header first, then exact ranged reads verified by CRC.

Opening a :class:`TensorFileReader` reads the first 64 KiB (or the 8-byte prefix and then the
header), checks the header against the file's real size (:func:`parse_header`) and, given the
writer's :class:`TensorFileRecord`, against the size, header CRC and tensor table recorded for it —
all before anything proportional to a claimed size is allocated. Tensors are then read into fresh
memory (never views into a cache or into each other) with ranged reads of exactly their bytes, or of
an element range, so resharding reads only what it needs. With a record, every block read is
checked against its CRC32 (a range also reads the at most two partial blocks at its ends, to check
them), and a mismatch raises :class:`CheckpointIntegrityError` naming the file, the tensor and the
byte range. :meth:`TensorFileReader.verify` checks the whole file against its digest.

:meth:`TensorFileReader.view_range` is the exception to fresh memory, for a caller that only copies
from the result (a load into live buffers): on local storage it checks the range's blocks straight
from a private memory map of the file, on several threads, and returns a view of the map. That skips
the read into fresh pages, which costs more than the page cache's copy itself.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .digests import FileHasher, crc32, parse_digest
from .errors import CheckpointFormatError, CheckpointIntegrityError
from .safetensors_header import (
    DTYPE_CODES, HEADER_PREFIX_BYTES, Header, HeaderLimits, TensorEntry, header_length, parse_header,
)
from .storage import Storage, check_name
from .tensor_bytes import byte_view
from .tensorfile_record import TensorFileRecord, TensorRecord

FIRST_READ_BYTES = 64 * 2**10
#: Threads that check the CRCs of a mapped range (CRC32 releases the GIL).
MAPPED_CHECK_THREADS = min(4, os.cpu_count() or 1)
_checkers: ThreadPoolExecutor | None = None


def _checker_pool() -> ThreadPoolExecutor:
    """The threads that check mapped ranges, started once: a load checks dozens of ranges, and
    starting threads for each cost more than the checks on a busy machine."""
    global _checkers
    if _checkers is None:
        _checkers = ThreadPoolExecutor(max_workers=MAPPED_CHECK_THREADS, thread_name_prefix="shardoptim-crc")
    return _checkers


def _forget_checkers() -> None:
    global _checkers
    _checkers = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_checkers)


class TensorFileReader:
    """One safetensors file on a :class:`Storage`, opened for checked reads.

    ``expected`` is the record the writer returned (from the manifest); with ``None`` the header is
    still validated strictly but the bytes cannot be checked, which only inspection tools should do.
    """

    def __init__(
        self,
        storage: Storage,
        name: str,
        *,
        expected: TensorFileRecord | None,
        limits: HeaderLimits = HeaderLimits(),
    ) -> None:
        self.storage = storage
        self._map: mmap.mmap | None = None
        self._mapped_checked: set[tuple[str, int]] = set()  # (tensor, CRC block) checked in the map
        self._partial_blocks: dict[tuple[str, int], memoryview] = {}  # the last range's checked end blocks
        self.name = check_name(name)
        self.url = storage.url_of(name)
        self.expected = expected
        self.size = storage.size(name)
        if expected is not None and self.size != expected.size:
            raise CheckpointIntegrityError(
                f"{self.url}: the file has {self.size} bytes but its record says {expected.size} (truncated or replaced?)"
            )
        first = storage.read_bytes(name, 0, min(self.size, FIRST_READ_BYTES))
        length = header_length(first, file_size=self.size, source=self.url, limits=limits)
        end = HEADER_PREFIX_BYTES + length
        json_bytes = first[HEADER_PREFIX_BYTES:end] if end <= len(first) else storage.read_bytes(name, HEADER_PREFIX_BYTES, end)
        if expected is not None:
            crc = crc32(json_bytes, crc32(first[:HEADER_PREFIX_BYTES]))
            if crc != expected.header_crc32:
                raise CheckpointIntegrityError(
                    f"{self.url}: header CRC32 {crc:08x} does not match the recorded {expected.header_crc32:08x} (corrupted?)"
                )
        self.header: Header = parse_header(json_bytes, file_size=self.size, source=self.url, limits=limits)
        if expected is not None:
            self._check_against_record(expected)

    def _check_against_record(self, expected: TensorFileRecord) -> None:
        table = [
            (e.name, DTYPE_CODES[e.dtype], e.shape, self.header.data_start + e.begin, e.nbytes) for e in self.header.tensors
        ]
        recorded = [(t.name, t.dtype, t.shape, t.offset, t.nbytes) for t in expected.tensors]
        if table != recorded:
            raise CheckpointFormatError(f"{self.url}: the header's tensor table does not match the file's record")

    @property
    def names(self) -> list[str]:
        """Tensor names in file order."""
        return [entry.name for entry in self.header.tensors]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.metadata)

    def entry(self, name: str) -> TensorEntry:
        return self.header.entry(name, source=self.url)

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, in fresh memory, checked against its CRCs when there is a record."""
        entry = self.entry(name)
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self._read_bytes(entry, 0, entry.nbytes, byte_view(out))
        return out

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor ``name`` as a fresh 1-D tensor.

        Reads only the bytes of that range (plus, with a record, the rest of the CRC blocks at its two
        ends, to check them).
        """
        entry = self._entry_for_range(name, start, stop)
        out = torch.empty(stop - start, dtype=entry.dtype)
        self._read_bytes(entry, start * entry.itemsize, stop * entry.itemsize, byte_view(out))
        return out

    def view_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of ``name``, checked as :meth:`read_range` checks them, as a view of
        a private memory map of the file where the storage is local (elsewhere: :meth:`read_range`).

        Views of one file share memory: copy from them, do not write to them or keep them.
        """
        if not self.storage.is_local or start == stop:
            return self.read_range(name, start, stop)
        entry = self._entry_for_range(name, start, stop)
        if self._map is None:
            self._map = self.storage.map_local(self.name)
        base = self.header.data_start + entry.begin
        byte_start, byte_stop = start * entry.itemsize, stop * entry.itemsize
        if self.expected is not None:
            self._check_mapped(entry, base, byte_start, byte_stop)
        return torch.frombuffer(self._map, dtype=entry.dtype, count=stop - start, offset=base + byte_start)

    def _entry_for_range(self, name: str, start: int, stop: int) -> TensorEntry:
        entry = self.entry(name)
        if type(start) is not int or type(stop) is not int or not 0 <= start <= stop <= entry.numel:
            raise ValueError(f"{self.url}: tensor {name!r}: element range [{start}, {stop}) is not inside [0, {entry.numel}]")
        return entry

    def _check_mapped(self, entry: TensorEntry, base: int, byte_start: int, byte_stop: int) -> None:
        """Check every CRC block that overlaps bytes ``[byte_start, byte_stop)`` of ``entry``, from the map;
        a block checked by an earlier view (ranges that meet inside a block, when resharding) once."""
        record = self.expected.tensor(entry.name)
        block = self.expected.crc_block_bytes
        crcs = record.block_crcs()
        mapped = memoryview(self._map)

        def check(index: int) -> None:
            lo, hi = index * block, min((index + 1) * block, entry.nbytes)
            self._check_block(record, index, lo, hi, mapped[base + lo : base + hi], crcs[index], None)

        indices = [index for index in range(byte_start // block, (byte_stop - 1) // block + 1)
                   if (entry.name, index) not in self._mapped_checked]
        list(_checker_pool().map(check, indices))  # raises the first mismatch
        self._mapped_checked.update((entry.name, index) for index in indices)

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, in file order."""
        return {name: self.read(name) for name in self.names}

    def _read_bytes(self, entry: TensorEntry, byte_start: int, byte_stop: int, out: memoryview) -> None:
        if byte_start == byte_stop:
            return
        base = self.header.data_start + entry.begin
        if self.expected is None:
            self.storage.read_into(self.name, base + byte_start, out)
            return
        record = self.expected.tensor(entry.name)
        block = self.expected.crc_block_bytes
        crcs = record.block_crcs()
        pending: Future[None] | None = None
        partial: dict[tuple[str, int], memoryview] = {}
        for index in range(byte_start // block, (byte_stop - 1) // block + 1):
            lo, hi = index * block, min((index + 1) * block, entry.nbytes)
            whole = byte_start <= lo and hi <= byte_stop
            keep = None if whole else (byte_start, byte_stop, out)
            checked = self._partial_blocks.get((entry.name, index))
            if checked is not None:  # the end block of the previous range, read and checked then
                self._keep(lo, hi, checked, (byte_start, byte_stop, out))
                continue
            target = out[lo - byte_start : hi - byte_start] if whole else memoryview(bytearray(hi - lo))
            self.storage.read_into(self.name, base + lo, target)
            if pending is not None:
                pending.result()
            pending = _checker_pool().submit(self._check_block, record, index, lo, hi, target, crcs[index], keep)
            if not whole:
                partial[(entry.name, index)] = target
        if pending is not None:
            pending.result()
        # Ranges read one after another (a parameter at a time) meet inside blocks: keep this one's ends.
        self._partial_blocks = partial

    def _check_block(
        self,
        record: TensorRecord,
        index: int,
        lo: int,
        hi: int,
        data: memoryview,
        expected_crc: int,
        copy_into: tuple[int, int, memoryview] | None,
    ) -> None:
        crc = crc32(data)
        if crc != expected_crc:
            raise CheckpointIntegrityError(
                f"{self.url}: tensor {record.name!r}: CRC32 mismatch in its bytes [{lo}, {hi}) (file offset "
                f"{record.offset + lo}, block {index}): read {crc:08x}, recorded {expected_crc:08x}; the file is corrupted"
            )
        self._keep(lo, hi, data, copy_into)

    @staticmethod
    def _keep(lo: int, hi: int, data: memoryview, copy_into: tuple[int, int, memoryview] | None) -> None:
        """Copy the part of block bytes ``[lo, hi)`` inside the range of ``copy_into`` into its buffer."""
        if copy_into is not None:
            byte_start, byte_stop, out = copy_into
            keep_lo, keep_hi = max(lo, byte_start), min(hi, byte_stop)
            out[keep_lo - byte_start : keep_hi - byte_start] = data[keep_lo - lo : keep_hi - lo]

    def _chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        for offset in range(0, self.size, chunk_bytes):
            yield self.storage.read_bytes(self.name, offset, min(offset + chunk_bytes, self.size))

    def verify(self, *, on_read: Callable[[int], None] | None = None) -> None:
        """Read the whole file and check it against the recorded digest; ``CheckpointIntegrityError`` if not.

        ``on_read(nbytes)``, when given, is called after each chunk is read (a progress bar's advance).
        """
        if self.expected is None:
            raise ValueError(f"{self.url}: no record to verify against")
        algorithm, _ = parse_digest(self.expected.digest, source=f"{self.url} record")
        hasher = FileHasher(algorithm)
        pending: Future[None] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardoptim-digest") as pool:
            for chunk in self._chunks(self.storage.read_chunk_bytes):
                if pending is not None:
                    pending.result()
                pending = pool.submit(hasher.update, chunk)
                if on_read is not None:
                    on_read(len(chunk))
            if pending is not None:
                pending.result()
        actual = hasher.digest()
        if actual != self.expected.digest:
            raise CheckpointIntegrityError(f"{self.url}: digest {actual} does not match the recorded {self.expected.digest}; the file is corrupted")
