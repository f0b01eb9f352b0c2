"""Filesystems that fail the way real storage does, for the fault tests: a disk that fills up, and a
directory that another job's retention deletes between listing it and reading it.

Both are fsspec filesystems over a real local directory (``storage_options={"root": ...}``), so every
rank process of a test sees the same files; importing this module registers their protocols.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


def disk_usage(root: str | Path) -> int:
    """Bytes in the files under ``root``."""
    return sum(entry.stat().st_size for entry in Path(root).rglob("*") if entry.is_file())


class _CountedWrites:
    """A file open for writing that refuses to grow the disk past its capacity, like a full disk."""

    def __init__(self, raw: Any, path: str, disk: FullDiskFileSystem) -> None:
        self._raw, self._path, self._disk = raw, path, disk
        self._written = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        others = disk_usage(self._disk.root) - (os.path.getsize(self._path) if os.path.exists(self._path) else 0)
        if others + self._written + size > self._disk.capacity():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        self._written += size
        return self._raw.write(data)

    def __enter__(self) -> _CountedWrites:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._raw.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class FullDiskFileSystem(DirFileSystem):
    """``fulldisk://path``: files under ``root``, which holds at most the number of bytes written in
    ``capacity_file`` (read at every write, so a test can "free space" by raising it or deleting files)."""

    protocol = "fulldisk"

    def __init__(self, root: str, capacity_file: str, **kwargs: Any) -> None:
        super().__init__(path=root, fs=LocalFileSystem(), **kwargs)
        self.root = root
        self.capacity_file = capacity_file

    def capacity(self) -> int:
        return int(Path(self.capacity_file).read_text())

    def open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        raw = super().open(path, mode, *args, **kwargs)
        if "w" not in mode and "a" not in mode:
            return raw
        return _CountedWrites(raw, os.path.join(self.root, path), self)


class VanishingFileSystem(DirFileSystem):
    """``vanishing://path``: files under ``root``; the first read of a tensor file inside directory
    ``vanish`` (after its manifest was read) deletes that whole directory first, as a concurrent
    job's retention would."""

    protocol = "vanishing"

    def __init__(self, root: str, vanish: str, **kwargs: Any) -> None:
        super().__init__(path=root, fs=LocalFileSystem(), **kwargs)
        self.root = root
        self.vanish = vanish
        self.vanished = False

    def _maybe_vanish(self, path: str) -> None:
        if not self.vanished and path.endswith(".safetensors") and self.vanish in Path(path).parts[:-1]:
            self.vanished = True
            shutil.rmtree(os.path.join(self.root, *Path(path).parts[: Path(path).parts.index(self.vanish) + 1]))

    def open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode:
            self._maybe_vanish(path)
        return super().open(path, mode, *args, **kwargs)

    def cat_file(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._maybe_vanish(path)
        return super().cat_file(path, *args, **kwargs)


fsspec.register_implementation(FullDiskFileSystem.protocol, FullDiskFileSystem, clobber=True)
fsspec.register_implementation(VanishingFileSystem.protocol, VanishingFileSystem, clobber=True)
