"""``verify_checkpoint(url)``: is a checkpoint complete, and is every byte what was written?

In three passes, each only if the one before passed: the manifest (present: the save committed; it
fits the schema and agrees with itself, :func:`check_consistency`); completeness (every file it
lists is there with the recorded size: nothing missing, truncated or extended); every byte (each
file hashed whole against its digest, and where that fails, its tensors read block by block so the
report names the tensor and the byte range that changed). Every file is checked, and the report
keeps the first failure for the one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .consistency import check_consistency
from .errors import CheckpointError, CheckpointIntegrityError
from .manifest import MANIFEST
from .progress import SILENT, Progress
from .reader import open_checkpoint
from .storage import Storage
from .tensorfile_reader import TensorFileReader


@dataclass
class FileCheck:
    """One listed file: its recorded size and digest, and what was wrong (None: nothing)."""

    name: str
    size: int
    digest: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class VerifyReport:
    """What ``verify_checkpoint`` found; ``problem`` is the first failure (None: the checkpoint is sound)."""

    url: str
    files: list[FileCheck] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url, "ok": self.ok, "problem": self.problem, "unlisted": self.unlisted,
            "files": [{"name": f.name, "size": f.size, "digest": f.digest, "ok": f.ok, "problem": f.problem}
                      for f in self.files],
        }


def verify_checkpoint(
    url: str, *, storage_options: dict[str, Any] | None = None, progress: Progress = SILENT,
) -> VerifyReport:
    """Check the checkpoint at ``url`` completely (reads every byte); never raises for a damaged one.

    ``FileNotFoundError`` only when nothing is at ``url``. An incomplete or damaged checkpoint gives a
    report whose ``problem`` names the first bad file (and tensor, where one is to blame).
    """
    report = VerifyReport(url)
    try:
        checkpoint = open_checkpoint(url, storage_options)
        check_consistency(checkpoint)
    except CheckpointError as error:
        report.problem = str(error)
        return report
    manifest, storage = checkpoint.manifest, checkpoint.storage
    report.url = checkpoint.url
    names = sorted(manifest.files)
    report.files = [FileCheck(name, manifest.files[name].size, manifest.files[name].digest) for name in names]
    report.unlisted = [name for name in storage.list() if name != MANIFEST and name not in manifest.files]
    for check in report.files:
        check.problem = _size_problem(storage, check)
    present = [check for check in report.files if check.ok]
    progress.start(sum(check.size for check in present), "verify")
    try:
        for check in present:
            check.problem = _content_problem(storage, check, manifest.files[check.name], progress)
    finally:
        progress.close()
    report.problem = next((check.problem for check in report.files if not check.ok), None)
    return report


def _size_problem(storage: Storage, check: FileCheck) -> str | None:
    try:
        size = storage.size(check.name)
    except FileNotFoundError:
        return f"{storage.url_of(check.name)}: missing (the manifest lists it with {check.size} bytes)"
    except OSError as error:
        return f"{storage.url_of(check.name)}: {error}"
    if size != check.size:
        how = "truncated" if size < check.size else "longer than written"
        return f"{storage.url_of(check.name)}: {size} bytes, the manifest records {check.size}: {how}"
    return None


def _content_problem(storage: Storage, check: FileCheck, record: Any, progress: Progress) -> str | None:
    try:
        reader = TensorFileReader(storage, check.name, expected=record)
        reader.verify(on_read=progress.advance)
        return None
    except CheckpointIntegrityError as error:
        blamed = _blame_tensor(storage, check.name, record)
        return blamed or str(error)
    except (CheckpointError, OSError, EOFError) as error:
        return str(error)


def _blame_tensor(storage: Storage, name: str, record: Any) -> str | None:
    """The first tensor whose bytes fail their CRCs, as the reader words it (None: none does)."""
    try:
        reader = TensorFileReader(storage, name, expected=record)
    except CheckpointError as error:  # the header itself changed
        return str(error)
    for tensor in reader.names:
        try:
            reader.read(tensor)
        except CheckpointIntegrityError as error:
            return str(error)
    return None
