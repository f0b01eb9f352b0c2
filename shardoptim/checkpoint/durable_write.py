"""Writes that become visible only complete and durable, one strategy per kind of storage.

What each backend does was found by experiment (docs/checkpoint-format.md, "Commit protocol"):

- **local disk**: a file is visible, growing, from the moment it is opened. So: a temporary file in
  the target directory, ``fsync``, then ``os.replace`` (or, create-only, ``os.link``, which fails with
  ``FileExistsError`` when the name exists, atomically), then ``fsync`` of the directory. Directories
  created on the way are fsynced into their parents.
- **S3** (s3fs): an object is invisible until its single PUT or its multipart upload completes, and a
  create-only write is the same write with ``If-None-Match: *`` (s3fs mode ``"xb"``), which the
  server refuses with 412 when the key exists, even when both writers started before either
  finished. But s3fs *commits on close*: leaving ``with fs.open(...)`` through an exception uploads
  the partial object. The writer here discards instead (aborting the multipart upload).
- **memory://**: a file shows, growing, as soon as it is opened, so it is written under a temporary
  name and moved (a move there replaces the store's entry whole). Create-only is check-and-move under
  a lock; the store exists only inside this process, so that is race-free.
- **any other fsspec backend**: temporary name and ``fs.mv``. Create-only there is check-then-move,
  which is not race-free between processes; a warning says so once per protocol.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol

from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

logger = logging.getLogger(__name__)

TEMPORARY_MARKER = ".tmp-"
_MEMORY_LOCK = threading.Lock()
_WARNED_PROTOCOLS: set[str] = set()
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a"})  # conditional writes verified against a real endpoint


def temporary_name(name: str) -> str:
    """A hidden sibling name for writing ``name`` before it is committed: ``.{name}.tmp-{random}``."""
    return f".{name}{TEMPORARY_MARKER}{uuid.uuid4().hex[:16]}"


def is_temporary_name(name: str) -> bool:
    """Whether a file name (last path component) is one of :func:`temporary_name`'s."""
    return name.startswith(".") and TEMPORARY_MARKER in name


class DurableWriter(Protocol):
    """Opens a file that appears at ``path`` only once the ``with`` block leaves without an exception."""

    def open(self, path: str, *, url: str, exclusive: bool) -> contextlib.AbstractContextManager[BinaryIO]: ...


def _protocol(fs: Any) -> str:
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


def writer_for(fs: Any) -> DurableWriter:
    """The commit strategy for this fsspec filesystem instance."""
    if isinstance(fs, LocalFileSystem):
        return LocalDurableWriter()
    if isinstance(fs, MemoryFileSystem):
        return RenameDurableWriter(fs, exclusive_lock=_MEMORY_LOCK)
    if _protocol(fs) in OBJECT_STORE_PROTOCOLS:
        return ObjectStoreDurableWriter(fs)
    return RenameDurableWriter(fs, exclusive_lock=None)


class _FullWrites(io.RawIOBase):
    """An unbuffered local file whose ``write`` loops until every byte is written."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.write(self._fd, view[written:])
        return written


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories_durable(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, fsyncing each new directory's entry into its parent."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory)
        _fsync_directory(os.path.dirname(directory))


class LocalDurableWriter:
    """Temporary file in the target directory, fsync, ``os.replace``/``os.link``, fsync the directory."""

    @contextlib.contextmanager
    def open(self, path: str, *, url: str, exclusive: bool) -> Iterator[BinaryIO]:
        directory, name = os.path.split(path)
        make_directories_durable(directory)
        if exclusive and os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "create-only write: the file already exists", url)
        temp = os.path.join(directory, temporary_name(name))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            yield _FullWrites(fd)  # type: ignore[misc]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            if exclusive:
                try:
                    os.link(temp, path)
                except FileExistsError:
                    raise FileExistsError(errno.EEXIST, "create-only write: the file already exists", url) from None
                except OSError as exc:
                    raise OSError(exc.errno, f"create-only commit needs hard links (os.link) on this filesystem: {exc.strerror}", url) from exc
                os.unlink(temp)
            else:
                os.replace(temp, path)
            _fsync_directory(directory)
        finally:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


class ObjectStoreDurableWriter:
    """A plain (or ``If-None-Match: *``) upload; discarded, never committed, when the block fails."""

    def __init__(self, fs: Any, *, part_bytes: int = 16 * 2**20) -> None:
        self.fs = fs
        self.part_bytes = part_bytes  # s3fs buffers one part; S3 allows at most 10,000 parts

    @contextlib.contextmanager
    def open(self, path: str, *, url: str, exclusive: bool) -> Iterator[BinaryIO]:
        if exclusive:  # fail fast; the conditional write at the end is what decides
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                raise FileExistsError(errno.EEXIST, "create-only write: the object already exists", url)
        f = self.fs.open(path, "xb" if exclusive else "wb", block_size=self.part_bytes)
        try:
            yield f
        except BaseException:
            try:
                f.discard()  # aborts the multipart upload, drops the buffer
            except Exception:  # the write's own error is the one to report
                logger.warning("could not abort the upload of %s; it stays invisible until it expires", url, exc_info=True)
            finally:
                f.closed = True  # so that neither close() nor __del__ commits the partial object
            raise
        try:
            f.close()
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "create-only write: the object already exists", url) from None
        finally:
            self.fs.invalidate_cache(path)


class RenameDurableWriter:
    """Write under a temporary name, then ``fs.mv`` into place (``memory://`` and unknown backends)."""

    def __init__(self, fs: Any, *, exclusive_lock: threading.Lock | None) -> None:
        self.fs = fs
        self.exclusive_lock = exclusive_lock

    def _commit(self, temp: str, path: str, *, url: str, exclusive: bool) -> None:
        if not exclusive:
            self.fs.mv(temp, path)
            return
        lock = self.exclusive_lock
        if lock is None:
            protocol = _protocol(self.fs)
            if protocol not in _WARNED_PROTOCOLS:
                _WARNED_PROTOCOLS.add(protocol)
                logger.warning(
                    "create-only writes on %s:// are check-then-move: two processes committing the same "
                    "name at the same moment may both succeed", protocol,
                )
            lock = contextlib.nullcontext()  # type: ignore[assignment]
        with lock:  # type: ignore[union-attr]
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                raise FileExistsError(errno.EEXIST, "create-only write: the file already exists", url)
            self.fs.mv(temp, path)

    @contextlib.contextmanager
    def open(self, path: str, *, url: str, exclusive: bool) -> Iterator[BinaryIO]:
        parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
        temp = f"{parent}/{temporary_name(name)}" if parent else temporary_name(name)
        if exclusive and self.fs.exists(path):
            raise FileExistsError(errno.EEXIST, "create-only write: the file already exists", url)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        try:
            with self.fs.open(temp, "wb") as f:
                yield f
            self._commit(temp, path, url=url, exclusive=exclusive)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(temp)
