"""Checkpoints under the faults real jobs meet: the disk fills up, a save dies and its step is saved
again, two jobs are pointed at one root, a checkpoint is deleted while it is restored, and a
replicated optimizer is checkpointed by every rank of a DDP job."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardoptim
from shardoptim import checkpoint
from shardoptim.checkpoint import CheckpointError
from shardoptim.checkpoint.manager import committed, step_directory
from shardoptim.checkpoint.manifest import MANIFEST, is_save_file

from . import faults, faulty_fs, scenarios
from .test_resharding import assert_same
from .test_save_load import assert_equal, components, setup, snapshot, train

REPO_ROOT = Path(__file__).resolve().parents[2]


def _disk(tmp_path: Path, capacity: int) -> dict[str, str]:
    (tmp_path / "disk").mkdir()
    capacity_file = tmp_path / "capacity"
    capacity_file.write_text(str(capacity))
    return {"root": str(tmp_path / "disk"), "capacity_file": str(capacity_file)}


def _set_capacity(options: dict[str, str], capacity: int) -> None:
    Path(options["capacity_file"]).write_text(str(capacity))


def _step_files(options: dict[str, str], step: int) -> list[str]:
    directory = Path(options["root"]) / "run" / step_directory(step)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
def test_a_full_disk_fails_the_save_keeps_the_last_checkpoint_and_the_job_can_go_on(tmp_path, async_):
    options = _disk(tmp_path, 1 << 30)
    job = setup()
    manager = checkpoint.CheckpointManager("fulldisk://run", keep_last=1, async_=async_, storage_options=options)
    train(*job, range(2))
    manager.save(1, **components(*job), extra={"step": 1})
    manager.wait()
    at_step_1 = snapshot(*job)
    used = faulty_fs.disk_usage(options["root"])
    _set_capacity(options, used + used // 3)

    train(*job, range(2, 4))
    with pytest.raises(CheckpointError, match="No space left on device") as raised:
        manager.save(2, **components(*job), extra={"step": 2})
        manager.wait()  # an async save's error surfaces here
    cause = raised.value.__cause__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    assert cause is not None and cause.errno == errno.ENOSPC
    assert MANIFEST not in _step_files(options, 2)
    assert not any(name.startswith(".") for name in _step_files(options, 2)), "a temporary file was left"
    # retention ran for no failed save: step 1 is still the newest, and restores exactly
    assert checkpoint.latest("fulldisk://run", options).endswith(step_directory(1))
    resumed = setup(seed=5)
    assert checkpoint.CheckpointManager("fulldisk://run", storage_options=options).restore(
        **components(*resumed)) == {"step": 1}
    assert_equal(snapshot(*resumed), at_step_1)

    _set_capacity(options, 1 << 30)  # the operator frees space; the same job saves the same step again
    manager.save(2, **components(*job), extra={"step": 2})
    manager.wait()
    names = _step_files(options, 2)
    manifest = checkpoint.open_checkpoint("fulldisk://run/" + step_directory(2), options).manifest
    assert sorted(names) == sorted([MANIFEST, *manifest.files]), "the failed save's files were not tidied"
    assert _step_files(options, 1) == [], "retention did not delete step 1 once step 2 committed"


def test_a_full_disk_during_a_two_rank_save_fails_every_rank_and_loses_nothing(worlds, tmp_path):
    options = _disk(tmp_path, 1 << 30)
    results = worlds.get(2).run(faults.save_onto_a_full_disk, "fulldisk://run", options)
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} did not see the failed save"
        assert "could not write their files" in result["error"] or "not committed" in result["error"]
    assert any("No space left on device" in result["error"] + result.get("cause", "") for result in results)
    assert MANIFEST not in _step_files(options, 2)
    _set_capacity(options, 1 << 30)
    model, opt, sched, ema = scenarios.build("AdamW", world=False)
    restored = checkpoint.CheckpointManager("fulldisk://run", storage_options=options)
    restored.restore(model=model, optimizer=opt, schedulers=[sched], ema=ema)
    assert restored.restored.endswith(step_directory(1))
    mine = scenarios.full_state(model, opt, sched, ema)
    for key in ("model", "optimizer", "lr", "sched", "ema", "ema_updates"):
        assert_same(mine[key], results[0]["state"][key], key)


def test_a_step_saved_again_after_a_dead_save_holds_only_the_committed_files(tmp_path):
    job = setup()
    train(*job, range(2))
    url = tmp_path / "run" / step_directory(4)
    url.mkdir(parents=True)
    # What a save killed mid-way leaves: a rank's file, its record, a temporary, under another save id.
    dead = "0123456789ab"
    for name in (f"rank00000-of-00002.{dead}.safetensors", f"record-rank00001.{dead}.json",
                 f".rank00001-of-00002.{dead}.safetensors.tmp-00ff00ff00ff00ff"):
        assert is_save_file(name)
        (url / name).write_bytes(b"partial")
    (url / "notes.txt").write_text("the user's own file")  # not ours: never deleted
    manager = checkpoint.CheckpointManager(str(tmp_path / "run"))
    manager.save(4, **components(*job))
    manifest = checkpoint.open_checkpoint(str(url)).manifest
    assert sorted(p.name for p in url.iterdir()) == sorted([MANIFEST, "notes.txt", *manifest.files])
    checkpoint.open_checkpoint(str(url)).verify()


def test_two_managers_under_one_root_never_delete_each_others_checkpoints(tmp_path):
    root = str(tmp_path / "run")
    first, second = setup(seed=1), setup(seed=2)
    job_a = checkpoint.CheckpointManager(root, keep_last=1)
    job_b = checkpoint.CheckpointManager(root, keep_last=1)
    for step in (1, 2, 3):
        job_a.save(step, **components(*first), extra={"job": "a"})
    for step in (10, 11):
        job_b.save(step, **components(*second), extra={"job": "b"})
    kept = {name: manifest.run for _, name, manifest in committed(root)}
    assert kept == {step_directory(3): job_a.run, step_directory(11): job_b.run}
    with pytest.raises(FileExistsError):
        job_b.save(3, **components(*second))  # a step the other job committed is refused, not replaced
    assert checkpoint.open_checkpoint(f"{root}/{step_directory(3)}").manifest.extra == {"job": "a"}

    resumed = checkpoint.CheckpointManager(root, keep_last=1)  # a restarted job continues the newest one's run
    assert resumed.restore(**components(*setup(seed=3))) == {"job": "b"}
    assert resumed.run == job_b.run
    resumed.save(12, **components(*second))
    assert [name for _, name, _ in committed(root)] == [
        step_directory(3), step_directory(12)]


def _job(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint.job_process", *args], cwd=REPO_ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _result(process: subprocess.Popen[str]) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_jobs_saving_the_same_steps_at_once_stop_cleanly_and_keep_their_own(tmp_path):
    root = str(tmp_path / "run")
    jobs = [_job("save", root, "12", "2") for _ in range(2)]
    results = [_result(job) for job in jobs]
    stopped = [result for result in results if result["error"]]
    assert stopped, f"both jobs committed every step of the same root: {results}"
    for result in stopped:
        assert result["error"].startswith(("FileExistsError", "CheckpointError")), result["error"]
    found = committed(root)
    for result in results:
        mine = [step for step, _, manifest in found if manifest.run == result["run"]]
        assert mine == result["committed"][-2:], (result, [(s, m.run) for s, _, m in found])
    for _, name, _ in found:
        checkpoint.open_checkpoint(f"{root}/{name}").verify()


def test_a_checkpoint_deleted_while_it_is_restored_falls_back_to_the_next_newest(tmp_path):
    job = setup()
    root = tmp_path / "disk"
    for step in (1, 2):
        train(*job, range(step, step + 1))
        checkpoint.save(str(root / "run" / step_directory(step)), **components(*job), extra={"step": step})
        if step == 1:
            at_step_1 = snapshot(*job)
    options = {"root": str(root), "vanish": step_directory(2)}
    resumed = setup(seed=9)
    manager = checkpoint.CheckpointManager("vanishing://run", storage_options=options)
    assert manager.restore(**components(*resumed)) == {"step": 1}
    assert manager.restored.endswith(step_directory(1))
    assert not (root / "run" / step_directory(2)).exists()
    assert_equal(snapshot(*resumed), at_step_1)


def test_restores_racing_a_job_that_saves_and_deletes_never_read_a_torn_checkpoint(tmp_path):
    root, stop = str(tmp_path / "run"), str(tmp_path / "stop")
    saver = _job("save", root, "100000", "1", stop)  # keeps only its newest: each save deletes the last one
    reader = _job("restore", root, "25", stop)
    read, saved = _result(reader), _result(saver)
    assert saved["error"] is None and saved["committed"] == list(range(1, len(saved["committed"]) + 1))
    assert read["steps"] == sorted(read["steps"]), "a restore went back to an older checkpoint"
    print(f"25 restores of steps {read['steps'][0]}..{read['steps'][-1]}, {read['retries']} retried after a deletion")


def test_a_replicated_optimizer_under_ddp_is_saved_by_every_rank_and_resumes(worlds, tmp_path):
    url = str(tmp_path / "ddp")
    saved = worlds.get(2).run(faults.replicated_save, url)
    manifest = checkpoint.open_checkpoint(url).manifest
    assert manifest.world_size == 2 and len(manifest.rng) == 2  # every rank's generators are kept
    resumed = worlds.get(2).run(faults.replicated_resume, url)
    for rank in range(2):
        assert_same(resumed[rank]["model"], saved[rank]["model"], f"rank {rank} model")
        assert_same(resumed[rank]["optimizer"], saved[rank]["optimizer"], f"rank {rank} optimizer")
        assert_same(resumed[rank]["after"], saved[rank]["after"], f"rank {rank} after two more steps")
    torch.manual_seed(1)
    alone = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Dropout(0.2), torch.nn.Linear(12, 3))
    single = shardoptim.AdamW(alone.parameters(), lr=0.01)
    assert checkpoint.load(url, model=alone, optimizer=single) == {"step": 3}  # one process: rank 0's generators
    assert_same(dict(alone.state_dict()), saved[0]["model"], "one process")
    assert_same(single.state_dict(), saved[0]["optimizer"], "one process")


def test_an_optimizer_that_cannot_shard_round_trips_under_a_process_group(worlds, tmp_path):
    assert worlds.get(2).run(faults.lbfgs_round_trip, str(tmp_path / "lbfgs")) == [True, True]
