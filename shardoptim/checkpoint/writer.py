"""``save``: every rank writes its own file; rank 0 commits the checkpoint with the manifest.

A save in four moves, each durable before the next (``Storage`` makes a file visible only whole):

1. rank 0 draws the save id and every rank learns it (one reduction);
2. every rank writes its file (rank 0 the shared one too) and a small record of it (size, digest);
3. rank 0 reads the records and writes ``MANIFEST.json`` create-only: the commit;
4. synchronously, every rank learns whether the commit happened, and raises if it did not.

A crash anywhere before 3 leaves files no manifest points to, under names with this save's id, so a
retry never overwrites them and no committed checkpoint ever changes. With ``async_=True`` 2 and 3
run on a background thread (rank 0 then waits for the other ranks' records to appear instead of
being told), which first copies the optimizer's shard to host memory while training goes on
(``staging``); at most one save is in flight, and its error surfaces at the next ``save()`` or at
``wait()``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core import Comm, LocalComm, Optimizer, ShardingConfig
from ..core.distributed import ProcessGroupComm
from ..ema import AveragedModel, ShardedEMA
from .arguments import check_components, check_records
from .capture import Snapshot, capture
from .errors import CheckpointError
from .json_codec import decode_json, encode_json
from .manifest import MANIFEST, Manifest, is_save_file, record_file, shard_file, shared_file
from .staging import BackgroundCopy
from .storage import Storage
from .tensorfile_record import TensorFileRecord
from .tensorfile_writer import write_tensor_file

logger = logging.getLogger(__name__)

#: How long rank 0's background commit waits for the other ranks' records.
RECORD_TIMEOUT_S = 1800.0

_pending: _SaveJob | None = None
_pending_lock = threading.Lock()


def comm_of(optimizer: Any, process_group: dist.ProcessGroup | None = None) -> Comm:
    """The ranks a checkpoint is collective over: ``process_group`` if given, else a sharded
    optimizer's group, else the default group when torch.distributed is initialized (a replicated
    optimizer under DDP: rank 0 writes what every rank holds, each rank its generators), else this
    process alone."""
    own = optimizer.comm if isinstance(optimizer, Optimizer) else LocalComm()
    if process_group is None:
        if own.world_size > 1 or not (dist.is_available() and dist.is_initialized()):
            return own
        process_group = dist.group.WORLD
    comm = ProcessGroupComm(process_group, ShardingConfig())
    if own.world_size > 1 and (own.world_size, own.rank) != (comm.world_size, comm.rank):
        raise ValueError(
            f"process_group (rank {comm.rank} of {comm.world_size}) is not the sharded optimizer's group "
            f"(rank {own.rank} of {own.world_size})"
        )
    return own if own.world_size > 1 else comm


def agree(comm: Comm, value: int, how: str = "max") -> int:
    """One integer combined over ranks (``"max"`` or ``"sum"``)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=comm.small_device)
    comm.launch_reduce(tensor, how, label="a checkpoint's agreement between ranks").wait()
    return int(tensor.item())


def save(
    url: str,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    schedulers: Sequence[Any] = (),
    ema: ShardedEMA | AveragedModel | None = None,
    extra: Any = None,
    async_: bool = False,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    step: int | None = None,
    metric: float | None = None,
    run: str | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Save a checkpoint to ``url`` (a local path or any fsspec URL): the model's parameters and
    buffers, the optimizer, the schedulers, the EMA, every rank's RNG states and ``extra`` (JSON data:
    step, epoch, data-loader position).

    Collective over the job: call it on every rank when the optimizer is sharded or torch.distributed
    is initialized (``process_group`` narrows it to a group; see ``comm_of``). Each rank writes about
    1/N of a sharded optimizer's bytes; nothing is gathered. Raises ``FileExistsError`` (on every rank)
    when a committed checkpoint is at ``url``, unless ``overwrite``. ``step`` and ``metric`` are
    recorded for ``latest()`` and ``CheckpointManager``'s retention, ``run`` for the manager to tell
    its checkpoints from another job's under the same root. With ``async_=True`` this returns
    once the tensors training may change are copied to host memory; the optimizer's shard is copied
    in the background, its next ``step()`` waiting for that copy (see ``staging``); ``wait()`` waits
    for the commit.
    """
    check_components(model, optimizer, schedulers, ema)
    check_records(step, metric, run)
    wait()
    comm = comm_of(optimizer, process_group)
    storage = Storage(url, storage_options)
    save_id = f"{agree(comm, secrets.randbits(47) if comm.rank == 0 else 0, 'sum'):012x}"
    if agree(comm, int(comm.rank == 0 and storage.exists(MANIFEST))) and not overwrite:
        raise FileExistsError(f"{storage.url_of(MANIFEST)}: a committed checkpoint is there; pass overwrite=True")
    snapshot = capture(
        rank=comm.rank, world_size=comm.world_size, model=model, optimizer=optimizer, schedulers=schedulers,
        ema=ema, extra=extra,
    )
    encode_json(snapshot.manifest)  # not JSON data (extra, a scheduler's state): refused before writing
    job = _SaveJob(storage, snapshot, save_id, step=step, metric=metric, run=run, overwrite=overwrite)
    if async_:
        job.staging = BackgroundCopy(snapshot, snapshot.stepped if isinstance(optimizer, Optimizer) else set(),
                                     optimizer)
        _start(job)
        return
    job.write_own_files()
    failed = agree(comm, int(job.error is not None), "sum")
    if failed:
        why = f": {job.error}" if job.error is not None else " (see their logs)"
        raise CheckpointError(f"{storage.url}: {failed} rank(s) could not write their files{why}") from job.error
    if comm.rank == 0:
        job.commit()
    if agree(comm, int(job.error is not None)):
        why = f": {job.error}" if job.error is not None else " (see rank 0's log)"
        raise CheckpointError(f"{storage.url}: the checkpoint was not committed{why}") from job.error


def wait() -> None:
    """Wait for the save in flight, if any; raise its error (the save is then not committed)."""
    global _pending
    with _pending_lock:
        job, _pending = _pending, None
    if job is not None:
        job.join()


def _start(job: _SaveJob) -> None:
    global _pending
    with _pending_lock:
        _pending = job
    job.start()


class _SaveJob:
    """One rank's part of one save: its files, its record, and on rank 0 the commit."""

    def __init__(
        self, storage: Storage, snapshot: Snapshot, save_id: str, *, step: int | None, metric: float | None,
        run: str | None, overwrite: bool,
    ) -> None:
        self.storage = storage
        self.snapshot = snapshot
        self.save_id = save_id
        self.step, self.metric, self.run, self.overwrite = step, metric, run, overwrite
        self.error: BaseException | None = None
        self.staging: BackgroundCopy | None = None
        self._thread: threading.Thread | None = None

    def write_own_files(self) -> None:
        """Write this rank's files, then its record; keep the error instead of raising it."""
        try:
            if self.staging is not None:
                self.snapshot = self.staging.finish()
            snapshot, records = self.snapshot, {}
            rank, world = snapshot.rank, snapshot.world_size
            name = shard_file(rank, world, self.save_id)
            records[name] = write_tensor_file(self.storage, name, snapshot.shard, exclusive=True)
            if rank == 0:
                name = shared_file(self.save_id)
                records[name] = write_tensor_file(self.storage, name, snapshot.shared, exclusive=True)
            record = {"rank": rank, "files": {n: r.to_dict() for n, r in records.items()}, "rng": snapshot.rng,
                      "owned_state": snapshot.owned_state}
            self.storage.write_bytes(record_file(rank, self.save_id), encode_json(record), exclusive=True)
        except BaseException as error:  # noqa: BLE001 - reported to every rank by save()
            logger.error("rank %d could not write its checkpoint files to %s: %s", self.snapshot.rank,
                         self.storage.url, error)
            self.error = error
            self._leave_error_record()

    def _leave_error_record(self) -> None:
        """Tell rank 0's background commit, which waits for this rank's record, that none will come."""
        name = record_file(self.snapshot.rank, self.save_id)
        try:
            data = encode_json({"rank": self.snapshot.rank, "error": f"{type(self.error).__name__}: {self.error}"})
            self.storage.write_bytes(name, data, exclusive=True)
        except Exception:  # noqa: BLE001 - the storage itself may be what failed; the timeout remains
            logger.warning("could not leave an error record at %s", self.storage.url_of(name))

    def commit(self, *, wait_for_records: bool = False) -> None:
        """Rank 0: the manifest from every rank's record, written create-only; keeps the error."""
        try:
            world = self.snapshot.world_size
            records = [self._record(rank, wait_for_records) for rank in range(world)]
            files = {}
            for record in records:
                for name, data in record["files"].items():
                    files[name] = TensorFileRecord.from_dict(data, source=f"record of rank {record['rank']}")
            parts = self.snapshot.manifest
            if any(record.get("owned_state") for record in records):
                per_parameter = parts["optimizer"]["per_parameter"]
                for record in records:
                    per_parameter.update(record["owned_state"])
            manifest = Manifest(
                save_id=self.save_id, world_size=world, files=files, params=parts.get("params", []),
                optimizer=parts.get("optimizer"), model=parts.get("model"), schedulers=parts.get("schedulers", []),
                ema=parts.get("ema"), rng=[record["rng"] for record in records], extra=parts.get("extra"),
                step=self.step, metric=self.metric, run=self.run,
            )
            if self.overwrite and self.storage.exists(MANIFEST):
                self.storage.delete(MANIFEST)
            self.storage.write_bytes(MANIFEST, manifest.to_bytes(), exclusive=True)
            self._tidy(manifest)
        except BaseException as error:  # noqa: BLE001 - reported to every rank by save()
            logger.error("could not commit the checkpoint at %s: %s", self.storage.url, error)
            self.error = error

    def _record(self, rank: int, wait_for_records: bool) -> dict[str, Any]:
        name = record_file(rank, self.save_id)
        deadline = time.monotonic() + RECORD_TIMEOUT_S
        while wait_for_records and not self.storage.exists(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.storage.url_of(name)}: rank {rank} did not finish its files")
            time.sleep(0.05)
        record = decode_json(self.storage.read_bytes(name), source=self.storage.url_of(name))
        if isinstance(record, dict) and "error" in record:
            raise CheckpointError(f"rank {rank} could not write its files: {record['error']}")
        if not isinstance(record, dict) or record.get("rank") != rank or not isinstance(record.get("files"), dict):
            raise CheckpointError(f"{self.storage.url_of(name)}: not the record of rank {rank}")
        return record

    def _tidy(self, manifest: Manifest) -> None:
        """After the commit: the records go, and what no manifest will point to: the files of an
        earlier save into this directory that died (a preempted job retrying its step) and, when
        overwriting, everything of the replaced checkpoint."""
        for rank in range(manifest.world_size):
            self.storage.delete(record_file(rank, self.save_id), missing_ok=True)
        for name in self.storage.list(include_temporary=True):
            if name == MANIFEST or name in manifest.files:
                continue
            if is_save_file(name) or (self.overwrite and self.save_id not in name):
                self.storage.delete(name, recursive=True, missing_ok=True)

    # -- in the background ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shardoptim-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.write_own_files()
        if self.error is None and self.snapshot.rank == 0:
            self.commit(wait_for_records=True)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self.staging is not None:
            self.staging.release()
        if self.error is not None:
            raise CheckpointError(f"the background save to {self.storage.url} failed: {self.error}") from self.error
