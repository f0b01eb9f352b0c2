"""Checkpoint storage: one directory on any fsspec filesystem, addressed by checked relative names.

``Storage(url, storage_options)`` takes a local path (the default) or any fsspec URL — ``memory://``,
``s3://bucket/prefix``, ``gs://…`` — and keeps it a ``str`` (``fsspec.core.url_to_fs`` resolves it;
``storage_options`` go to the filesystem unchanged). Every file is then named relative to that root,
and names are checked (:func:`check_name`), so a name taken from a hostile manifest cannot reach
outside the checkpoint: no ``..``, no absolute paths, no URL schemes, no backslashes.

Writes become visible only complete (:mod:`.durable_write` says how, per backend); reads are ranged
and exact (a short read is an ``EOFError``, on every backend alike). Metadata calls drop s3fs's
listing cache first, so another process's writes are seen.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import mmap
import os
import re
from collections.abc import Mapping
from typing import Any, BinaryIO

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .durable_write import is_temporary_name, writer_for

_FORBIDDEN_CHARS = re.compile(r"[\\:\x00-\x1f\x7f]")
MAX_NAME_PART = 255


def check_name(name: object, *, allow_empty: bool = False) -> str:
    """Return ``name`` if it is a safe relative name (``a/b.safetensors``), else ``ValueError`` naming it.

    Each ``/``-separated part must be non-empty, not ``.`` or ``..``, at most 255 characters, and free
    of backslashes, colons and control characters; so the name cannot be absolute, climb out of the
    root, or carry a URL scheme or a Windows drive.
    """
    if not isinstance(name, str):
        raise TypeError(f"file name must be str, got {type(name).__name__} {name!r:.80}")
    if name == "" and allow_empty:
        return name
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", "..") or len(part) > MAX_NAME_PART or _FORBIDDEN_CHARS.search(part):
            raise ValueError(
                f"unsafe file name {name!r:.200}: parts must be non-empty, not '.' or '..', at most "
                f"{MAX_NAME_PART} characters, without '\\', ':' or control characters, and not start with '/'"
            )
    return name


class Storage:
    """A directory of checkpoint files on an fsspec filesystem; every method takes a relative name."""

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        read_chunk_bytes: int = 8 * 2**20,
    ) -> None:
        if not isinstance(url, (str, os.PathLike)):
            raise TypeError(f"url must be a str (a path or an fsspec URL), got {type(url).__name__}")
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(f"storage_options must be a dict of the filesystem's options, got "
                            f"{type(storage_options).__name__}")
        text = os.fspath(url)
        stripped = text.rstrip("/")
        self.url = text if not stripped or stripped.endswith(":") else stripped  # keep "/" and "memory://"
        self.storage_options = dict(storage_options or {})
        self.fs, root = url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/") or "/"
        self.read_chunk_bytes = read_chunk_bytes
        self._writer = writer_for(self.fs)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def child(self, name: str) -> Storage:
        """The storage rooted at a subdirectory (which need not exist yet)."""
        child = copy.copy(self)  # the same filesystem instance and commit strategy
        child.url, child.root = self.url_of(check_name(name)), self._path(name)
        return child

    def url_of(self, name: str) -> str:
        """The full URL of ``name``, as errors and logs show it."""
        check_name(name, allow_empty=True)
        if not name:
            return self.url
        return self.url + name if self.url.endswith("/") else f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        check_name(name, allow_empty=True)
        if not name:
            return self.root
        return f"{self.root}/{name}" if self.root != "/" else f"/{name}"

    def _forget_cached(self, path: str) -> None:
        self.fs.invalidate_cache(path)
        self.fs.invalidate_cache(path.rsplit("/", 1)[0] or "/")

    # writing

    def open_write(self, name: str, *, exclusive: bool = False) -> contextlib.AbstractContextManager[BinaryIO]:
        """A binary file that appears at ``name`` whole and durable when the ``with`` block ends.

        If the block raises, nothing appears and the temporary data is removed (or the upload aborted).
        ``exclusive=True`` is a create-only write: ``FileExistsError`` if ``name`` exists, including
        when another writer commits it first while this one is writing.
        """
        return self._writer.open(self._path(check_name(name)), url=self.url_of(name), exclusive=exclusive)

    def write_bytes(self, name: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        """Write a whole small file (a manifest) with :meth:`open_write`'s guarantees."""
        with self.open_write(name, exclusive=exclusive) as f:
            f.write(data)

    # reading

    def read_bytes(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``name`` (the whole file by default); ``EOFError`` if the file is shorter."""
        path = self._path(check_name(name))
        if start is None and end is None:
            return self.fs.cat_file(path)
        start = 0 if start is None else start
        end = self.size(name) if end is None else end
        if not 0 <= start <= end:
            raise ValueError(f"{self.url_of(name)}: byte range [{start}, {end}) is not 0 <= start <= end")
        if start == end:
            return b""
        try:
            data = self.fs.cat_file(path, start=start, end=end)  # keywords: s3fs's 2nd positional is version_id
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # s3: 416 Range Not Satisfiable
                raise EOFError(f"{self.url_of(name)}: bytes [{start}, {end}) are past the end of the file") from None
            raise
        if len(data) != end - start:
            raise EOFError(f"{self.url_of(name)}: wanted bytes [{start}, {end}) but the file ended after {len(data)} of them")
        return data

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` (writable, any format) with the file's bytes from ``offset``; ``EOFError`` if short.

        Local files are read straight into the buffer; other backends in ``read_chunk_bytes`` ranged
        requests, so the extra memory is one chunk.
        """
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        if offset < 0:
            raise ValueError(f"{self.url_of(name)}: offset must be >= 0, got {offset}")
        if self.is_local:
            self._read_into_local(name, offset, view)
            return
        chunk = self.read_chunk_bytes
        for begin in range(0, len(view), chunk):
            stop = min(begin + chunk, len(view))
            view[begin:stop] = self.read_bytes(name, offset + begin, offset + stop)

    def _read_into_local(self, name: str, offset: int, view: memoryview) -> None:
        with open(self._path(check_name(name)), "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < len(view):
                count = f.readinto(view[done:])
                if not count:
                    raise EOFError(
                        f"{self.url_of(name)}: wanted bytes [{offset}, {offset + len(view)}) but the file "
                        f"ended after {done} of them"
                    )
                done += count

    def map_local(self, name: str) -> mmap.mmap:
        """A private memory map of the whole local file ``name``: its pages are the page cache's, read
        without a copy, and a write to the map stays in this process (never reaches the file)."""
        if not self.is_local:
            raise ValueError(f"{self.url_of(name)}: only a local file can be memory-mapped")
        with open(self._path(check_name(name)), "rb", buffering=0) as f:
            return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    # metadata

    def exists(self, name: str = "") -> bool:
        path = self._path(name)
        self._forget_cached(path)
        return bool(self.fs.exists(path))

    def size(self, name: str) -> int:
        """The file's size in bytes; ``FileNotFoundError`` naming its URL if it does not exist."""
        path = self._path(check_name(name))
        self._forget_cached(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such checkpoint file", self.url_of(name)) from None
        if info.get("type") != "file":
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", self.url_of(name))
        return int(info["size"])

    def list(self, name: str = "", *, include_temporary: bool = False) -> list[str]:
        """Sorted names (last components) of the files and directories directly under ``name``.

        Temporary files of unfinished writes are left out unless ``include_temporary``.
        ``FileNotFoundError`` if ``name`` does not exist.
        """
        path = self._path(name)
        self._forget_cached(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such checkpoint directory", self.url_of(name)) from None
        prefix = path.rstrip("/") + "/"
        names = set()
        for entry in entries:
            entry = entry.rstrip("/")
            if not entry.startswith(prefix):
                continue  # ls of a file lists the file itself
            child = entry[len(prefix):]
            if child and (include_temporary or not is_temporary_name(child)):
                names.add(child)
        return sorted(names)

    def delete(self, name: str, *, recursive: bool = False, missing_ok: bool = False) -> None:
        """Remove a file, or with ``recursive`` a directory and everything under it."""
        path = self._path(check_name(name))
        if not self.exists(name):
            if missing_ok:
                return
            raise FileNotFoundError(errno.ENOENT, "nothing to delete", self.url_of(name))
        self.fs.rm(path, recursive=recursive)
        self._forget_cached(path)
