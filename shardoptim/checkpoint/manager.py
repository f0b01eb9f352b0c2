"""A series of checkpoints under one root: ``latest(root)`` and ``CheckpointManager``."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

import torch.distributed as dist

from .errors import CheckpointError
from .manifest import MANIFEST, Manifest
from .reader import IncompleteCheckpointError
from .restore import load
from .storage import Storage
from .writer import agree, comm_of, save, wait

logger = logging.getLogger(__name__)

_STEP_DIRECTORY = re.compile(r"step-(\d+)")
#: How often ``restore`` tries the newest checkpoint when the one it reads is deleted meanwhile.
RESTORE_ATTEMPTS = 10
RELIST_DELAY_S = 1.0
_NOTHING = -2  # the "step" of an empty root in the ranks' agreement (a stepless checkpoint is -1)


def step_directory(step: int) -> str:
    """The directory ``CheckpointManager`` saves step ``step`` in (names sort by step)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"step-{step:012d}"


def committed(root: str, storage_options: dict[str, Any] | None = None) -> list[tuple[int, str, Manifest]]:
    """Every committed checkpoint directly under ``root``: ``(step, name, manifest)``, oldest first.

    A directory without a manifest (a save that did not finish) is not one; neither is one whose
    manifest does not read (logged). A checkpoint saved without a step sorts by its name's number,
    or first.
    """
    storage = Storage(root, storage_options)
    if not storage.exists():
        return []
    found = []
    for name in storage.list():
        child = storage.child(name)
        if not child.exists(MANIFEST):
            continue
        try:
            manifest = Manifest.from_bytes(child.read_bytes(MANIFEST), source=child.url_of(MANIFEST))
        except (CheckpointError, OSError) as error:
            logger.warning("skipping %s: %s", child.url, error)
            continue
        named = _STEP_DIRECTORY.fullmatch(name)
        step = manifest.step if manifest.step is not None else int(named.group(1)) if named else -1
        found.append((step, name, manifest))
    return sorted(found, key=lambda entry: (entry[0], entry[1]))


def latest(root: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The URL of the newest committed checkpoint under ``root``, or None when there is none."""
    found = committed(root, storage_options)
    return Storage(root, storage_options).url_of(found[-1][1]) if found else None


class CheckpointManager:
    """Saves step after step under ``root`` and keeps only some: the newest ``keep_last`` and the
    ``keep_best`` best by the metric given to ``save`` (``metric_mode`` "min" or "max").

    Old checkpoints are deleted only after a new one has committed (by rank 0; with ``async_`` once
    the background save is done), and only checkpoints of this manager's run: every save records the
    ``run`` (given, or taken from the checkpoint ``restore`` resumed from, or new), so a second job
    pointed at the same root by mistake never deletes the first one's checkpoints (and a save into a
    step directory the other job committed fails with ``FileExistsError``). ``restore(...)`` loads the
    newest one every rank sees, if any, and returns its ``extra``; if that one is deleted while it is
    read (another job's retention), the next newest is tried. Collective like ``save``/``load``
    (``process_group`` as theirs): call every method on every rank.
    """

    def __init__(
        self,
        root: str,
        keep_last: int | None = None,
        keep_best: int | None = None,
        metric_mode: str = "min",
        *,
        async_: bool = False,
        storage_options: dict[str, Any] | None = None,
        run: str | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if metric_mode not in ("min", "max"):
            raise ValueError(f"metric_mode must be 'min' or 'max', got {metric_mode!r}")
        self.root = root
        self.keep_last, self.keep_best, self.metric_mode = keep_last, keep_best, metric_mode
        self.async_ = async_
        self.storage_options = storage_options
        self._storage = Storage(root, storage_options)
        self._rank = 0
        self._retention_due = False  # a save committed (or in flight) since the last retention
        self.run = run
        self.process_group = process_group
        self.restored: str | None = None  # the URL ``restore`` loaded

    def url_for(self, step: int) -> str:
        return self._storage.url_of(step_directory(step))

    def save(self, step: int, *, metric: float | None = None, **components: Any) -> str:
        """``shardoptim.checkpoint.save`` of ``components`` (model, optimizer, schedulers, ema, extra)
        as step ``step``; then retention. Returns the checkpoint's URL."""
        self.wait()
        url = self.url_for(step)
        if self.run is None:
            self.run = secrets.token_hex(8)
        save(url, **components, async_=self.async_, storage_options=self.storage_options, step=step, metric=metric,
             run=self.run, process_group=self.process_group)
        self._rank = comm_of(components.get("optimizer"), self.process_group).rank
        self._retention_due = True
        if not self.async_:
            self._apply_retention()
        return url

    def wait(self) -> None:
        """Wait for the save in flight (raising its error) and apply the retention it makes due."""
        wait()
        self._apply_retention()

    def latest(self) -> str | None:
        return latest(self.root, self.storage_options)

    def restore(self, **components: Any) -> Any:
        """Load the newest checkpoint into ``components`` and return its ``extra``; None if there is none.

        Every rank loads the same one: the ranks agree on the newest step they all see (listings can
        lag on some storages) and retry together when it is deleted while being read. Its URL is left
        in ``restored``, and this manager's run continues its run.
        """
        comm = comm_of(components.get("optimizer"), self.process_group)
        for _ in range(RESTORE_ATTEMPTS):
            found = committed(self.root, self.storage_options)
            newest = found[-1][0] if found else _NOTHING
            if agree(comm, newest, "max") != -agree(comm, -newest, "max"):
                logger.warning("%s: the ranks list different newest checkpoints; listing again", self.root)
                time.sleep(RELIST_DELAY_S)
                continue
            if newest == _NOTHING:
                return None
            _, name, manifest = found[-1]
            url = self._storage.url_of(name)
            try:
                extra = load(url, **components, storage_options=self.storage_options,
                             process_group=self.process_group)
            except Exception as error:
                if not agree(comm, int(isinstance(error, (FileNotFoundError, IncompleteCheckpointError)))):
                    raise
                logger.warning("%s went away while it was read; trying the newest again", url)
                continue
            self.restored = url
            self.run = self.run or manifest.run
            return extra
        raise CheckpointError(f"{self.root}: no checkpoint could be agreed on and read in {RESTORE_ATTEMPTS} tries")

    def _apply_retention(self) -> None:
        due, self._retention_due = self._retention_due, False
        if not due or self._rank != 0 or (self.keep_last is None and self.keep_best is None):
            return
        found = [entry for entry in committed(self.root, self.storage_options) if entry[2].run == self.run]
        keep = {name for _, name, _ in found[-self.keep_last:]} if self.keep_last else {name for _, name, _ in found}
        if self.keep_best:
            rated = [entry for entry in found if entry[2].metric is not None]
            rated.sort(key=lambda entry: entry[2].metric, reverse=self.metric_mode == "max")
            keep |= {name for _, name, _ in rated[: self.keep_best]}
        for _, name, _ in found:
            if name not in keep:
                logger.info("retention: deleting %s", self._storage.url_of(name))
                self._storage.delete(name, recursive=True, missing_ok=True)
