"""The long versions of the reliability suites: many kills, many hostile checkpoints, many restarts.

Run from the repository root::

    python -m bench.reliability                 # every suite at its full size: about 25 minutes on 2 cores
    python -m bench.reliability --only kills,fuzz --kills 20 --fuzz 200   # a quick look

Each suite is the one CI runs a few trials of (the test named in brackets), run many times, and
counts what happened; docs/reliability.md quotes the table it prints:

- ``kills`` [tests/checkpoint/test_crash.py]: a process saving checkpoint after checkpoint is
  SIGKILLed at a random moment, on local disk and on a moto S3 server; then ``latest()`` must be a
  complete checkpoint, at least as new as the last commit reported, that verifies and loads.
- ``fuzz`` [tests/checkpoint/test_hostile.py]: real checkpoints mutated at random (manifest fields,
  bytes, safetensors headers) and loaded under an address-space limit: each loads or is refused with
  a checkpoint error, and a refusal changes no live state.
- ``restarts`` [tests/distributed/test_resume.py]: launch/train.py under ``torchrun --max-restarts 1``
  with 2 gloo ranks, rank 1 SIGKILLed at a random step (saves every 3-6 steps, sync or async): the
  job restarts, resumes, and ends bit for bit in the state of an uninterrupted run.
- ``hangs`` [tests/distributed/test_sharded_training.py]: a peer that never joins the step's
  collective: the other rank fails within ``collective_timeout_s`` with an error naming it.
- ``disk-full`` [tests/checkpoint/test_faults.py]: the disk fills at a random point of a save: the
  save fails with ENOSPC, the previous checkpoint stays whole, and once space is freed the job saves
  the same step again.
- ``concurrency`` [tests/checkpoint/test_faults.py]: two jobs saving the same steps under one root,
  and restores racing a job that saves and deletes: no checkpoint damaged, no torn restore.

A "loss" is any checkpoint lost or damaged, any wrong resume, any crash or changed state on a
hostile input, any hang past its timeout: the figure that must be 0. Results go to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("kills", "fuzz", "restarts", "hangs", "disk-full", "concurrency")


def _kills(work: Path, trials: int, s3_trials: int) -> dict[str, Any]:
    from tests.checkpoint.crash_saver import check_latest, kill_while_saving
    from tests.checkpoint.moto_server import BUCKET, s3_server

    outcomes: Counter[str] = Counter()
    losses: list[str] = []
    plans = [("local", trial) for trial in range(trials)] + [("s3", trial) for trial in range(s3_trials)]
    with s3_server() if s3_trials else contextlib.nullcontext({}) as s3_options:
        for backend, trial in plans:
            options = s3_options if backend == "s3" else {}
            root = f"s3://{BUCKET}/kill-{trial}" if backend == "s3" else str(work / f"kill-{trial}")
            reported = kill_while_saving(root, options, seed=1000 + trial)
            try:
                outcomes[f"{backend}: {check_latest(root, options, reported)}"] += 1
            except Exception as error:  # noqa: BLE001 - a loss, counted and described
                losses.append(f"{backend} trial {trial}: {type(error).__name__}: {error}")
    return {"trials": len(plans), "faults injected": len(plans), "outcomes": dict(outcomes), "losses": losses}


def _fuzz(work: Path, cases: int) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    losses: list[str] = []
    seeds = list(range(100, 100 + max(1, cases // 250)))
    per_seed = [cases // len(seeds) + (i < cases % len(seeds)) for i in range(len(seeds))]
    for seed, count in zip(seeds, per_seed):
        run = subprocess.run([sys.executable, "-m", "tests.checkpoint.fuzz", str(work / f"fuzz-{seed}"), str(count),
                              str(seed)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if run.returncode != 0:
            losses.append(f"seed {seed}: the fuzz process failed: {run.stderr[-500:]}")
            continue
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        outcomes.update(summary["outcomes"])
        losses += summary["problems"]
    return {"trials": cases, "inputs tried": cases, "outcomes": dict(outcomes), "losses": losses}


def _restarts(work: Path, trials: int) -> dict[str, Any]:
    from tests.distributed.elastic import STEPS, assert_same_state, final_state, torchrun

    reference_path = work / "uninterrupted.safetensors"
    torchrun("--final-state", str(reference_path))
    reference = final_state(reference_path)
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    losses: list[str] = []
    for trial in range(trials):
        kill, every, saving = rng.randint(4, STEPS - 2), rng.choice([3, 4, 6]), rng.choice(["sync", "async"])
        final = work / f"restart-{trial}.safetensors"
        try:
            run = torchrun("--ckpt-dir", str(work / f"restart-{trial}"), "--save-every", str(every),
                           "--kill-at-step", str(kill), "--final-state", str(final),
                           *(["--async-save"] if saving == "async" else []), max_restarts=1)
            assert re.search(r"exitcode: -9\b", run.stderr), "torchrun did not see the SIGKILL"
            resumed = re.search(r"resumed from \S+: step (\d+) of", run.stdout)
            newest_before_kill = (kill - 1) // every * every
            if resumed is None:
                in_flight = saving == "async" and newest_before_kill - every <= 0
                assert newest_before_kill == 0 or in_flight, "no resume although a checkpoint had committed"
                outcomes["restarted from step 0"] += 1
            else:
                step = int(resumed.group(1))
                allowed = {newest_before_kill} | ({newest_before_kill - every} if saving == "async" else set())
                assert step in allowed, f"resumed from step {step}, expected one of {sorted(allowed)}"
                outcomes[f"resumed ({saving} saves)"] += 1
            assert_same_state(final, reference)
        except Exception as error:  # noqa: BLE001 - a loss, counted and described
            losses.append(f"trial {trial} (kill at {kill}, save every {every}, {saving}): "
                          f"{type(error).__name__}: {str(error)[:600]}")
    return {"trials": trials, "faults injected": trials, "outcomes": dict(outcomes), "losses": losses}


def _hangs(trials: int, timeout_s: float = 2.0) -> dict[str, Any]:
    from tests.distributed import scenarios
    from tests.distributed.world import World

    outcomes: Counter[str] = Counter()
    losses: list[str] = []
    longest = 0.0
    for trial in range(trials):
        world = World(2)
        try:
            outcome = world.run(scenarios.a_peer_that_never_comes, timeout_s, timeout=timeout_s + 60)[0]
            seconds, kind, message = outcome.split("|", 2)
            longest = max(longest, float(seconds))
            if kind != "CollectiveError" or "step 1" not in message or float(seconds) > timeout_s + 5:
                losses.append(f"trial {trial}: {outcome[:300]}")
            else:
                outcomes["failed within the timeout, naming the collective"] += 1
        except Exception as error:  # noqa: BLE001 - a loss, counted and described
            losses.append(f"trial {trial}: {type(error).__name__}: {str(error)[:300]}")
        finally:
            world.close()
    return {"trials": trials, "faults injected": trials, "outcomes": dict(outcomes), "losses": losses,
            "timeout s": timeout_s, "longest wait s": round(longest, 2)}


def _disk_full(work: Path, trials: int) -> dict[str, Any]:
    from shardoptim import checkpoint
    from shardoptim.checkpoint.manifest import MANIFEST
    from tests.checkpoint import faulty_fs
    from tests.checkpoint.test_save_load import assert_equal, components, setup, snapshot, train

    rng = random.Random(11)
    outcomes: Counter[str] = Counter()
    losses: list[str] = []
    for trial in range(trials):
        disk, capacity = work / f"disk-{trial}", work / f"capacity-{trial}"
        disk.mkdir()
        capacity.write_text(str(1 << 40))
        options = {"root": str(disk), "capacity_file": str(capacity)}
        async_ = trial % 2 == 1
        try:
            job = setup(seed=trial)
            manager = checkpoint.CheckpointManager("fulldisk://run", keep_last=1, async_=async_, storage_options=options)
            train(*job, range(2))
            manager.save(1, **components(*job), extra={"step": 1})
            manager.wait()
            at_step_1 = snapshot(*job)
            used = faulty_fs.disk_usage(disk)
            capacity.write_text(str(used + int(used * rng.uniform(0.0, 1.2))))  # full at a random point
            train(*job, range(2, 4))
            try:
                manager.save(2, **components(*job), extra={"step": 2})
                manager.wait()
                outcomes["the save fitted"] += 1
                continue
            except checkpoint.CheckpointError as error:
                assert "No space left on device" in str(error), f"unclear error: {error}"
            outcomes[f"ENOSPC ({'async' if async_ else 'sync'}): failed clearly, step 1 kept"] += 1
            assert checkpoint.latest("fulldisk://run", options).endswith("step-000000000001")
            resumed = setup(seed=99)
            assert checkpoint.load(checkpoint.latest("fulldisk://run", options), **components(*resumed),
                                   storage_options=options) == {"step": 1}
            assert_equal(snapshot(*resumed), at_step_1)
            capacity.write_text(str(1 << 40))
            manager.save(2, **components(*job), extra={"step": 2})
            manager.wait()
            step_2 = disk / "run" / "step-000000000002"
            manifest = checkpoint.open_checkpoint(str(step_2)).manifest
            assert sorted(p.name for p in step_2.iterdir()) == sorted([MANIFEST, *manifest.files])
            checkpoint.open_checkpoint(str(step_2)).verify()
        except Exception as error:  # noqa: BLE001 - a loss, counted and described
            losses.append(f"trial {trial}: {type(error).__name__}: {str(error)[:300]}")
    faults = sum(count for outcome, count in outcomes.items() if outcome.startswith("ENOSPC"))
    return {"trials": trials, "faults injected": faults, "outcomes": dict(outcomes), "losses": losses}


def _job(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.checkpoint.job_process", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _result(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=1800)
    if process.returncode != 0:
        raise RuntimeError(err[-1000:])
    return json.loads(out.strip().splitlines()[-1])


def _concurrency(work: Path, pairs: int, restores: int) -> dict[str, Any]:
    from shardoptim import checkpoint
    from shardoptim.checkpoint.manager import committed

    outcomes: Counter[str] = Counter()
    losses: list[str] = []
    for trial in range(pairs):
        root = str(work / f"two-jobs-{trial}")
        try:
            results = [_result(job) for job in [_job("save", root, "12", "2") for _ in range(2)]]
            found = committed(root)
            for result in results:
                mine = [step for step, _, manifest in found if manifest.run == result["run"]]
                assert mine == result["committed"][-2:], f"job {result['run']}: kept {mine}, committed {result}"
                outcomes["stopped at a step the other job had committed" if result["error"] else "saved every step"] += 1
            for _, name, _ in found:
                checkpoint.open_checkpoint(f"{root}/{name}").verify()
        except Exception as error:  # noqa: BLE001 - a loss, counted and described
            losses.append(f"two jobs, trial {trial}: {type(error).__name__}: {str(error)[:300]}")
    root, stop = str(work / "race"), str(work / "race.stop")
    saver = _job("save", root, "1000000", "1", stop)
    reader = _job("restore", root, str(restores), stop)
    try:
        read, saved = _result(reader), _result(saver)
        assert saved["error"] is None, saved["error"]
        assert read["steps"] == sorted(read["steps"]), "a restore went back to an older checkpoint"
        outcomes["restores racing saves and deletions (whole, never torn)"] += len(read["steps"])
        outcomes["of them retried after their checkpoint was deleted"] += read["retries"]
        outcomes["saves by the racing job"] += len(saved["committed"])
    except Exception as error:  # noqa: BLE001 - a loss, counted and described
        losses.append(f"race: {type(error).__name__}: {str(error)[:300]}")
    return {"trials": 2 * pairs + restores, "outcomes": dict(outcomes), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    parser.add_argument("--kills", type=int, default=100, help="kill trials on local disk")
    parser.add_argument("--s3-kills", type=int, default=20, help="kill trials on the moto S3 server")
    parser.add_argument("--fuzz", type=int, default=1000, help="hostile checkpoints")
    parser.add_argument("--restarts", type=int, default=20, help="torchrun restarts after a SIGKILL")
    parser.add_argument("--hangs", type=int, default=10, help="peers that never come")
    parser.add_argument("--disk-full", type=int, default=40, help="saves onto a disk that fills")
    parser.add_argument("--pairs", type=int, default=10, help="pairs of jobs saving under one root")
    parser.add_argument("--restores", type=int, default=200, help="restores racing a saving job")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "reliability.json"))
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s) {sorted(unknown)}; choose from {', '.join(SUITES)}")

    sys.path.insert(0, str(ROOT))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shardoptim-reliability-") as temporary:
        work = Path(temporary)
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "kills": lambda: _kills(work, args.kills, args.s3_kills),
            "fuzz": lambda: _fuzz(work, args.fuzz),
            "restarts": lambda: _restarts(work, args.restarts),
            "hangs": lambda: _hangs(args.hangs),
            "disk-full": lambda: _disk_full(work, args.disk_full),
            "concurrency": lambda: _concurrency(work, args.pairs, args.restores),
        }
        for name in chosen:
            started = time.perf_counter()
            try:
                results[name] = runs[name]()
            except Exception:  # noqa: BLE001 - the suite itself broke: reported as a loss
                results[name] = {"trials": 0, "outcomes": {}, "losses": [traceback.format_exc()]}
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            _print_suite(name, results[name])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    total_losses = sum(len(result["losses"]) for result in results.values())
    print(f"\nlosses: {total_losses} in {sum(r['trials'] for r in results.values())} trials; results in {args.json}")
    sys.exit(1 if total_losses else 0)


def _print_suite(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}: {result['trials']} trials in {result['seconds']} s, losses: {len(result['losses'])}")
    for key in ("faults injected", "inputs tried", "timeout s", "longest wait s"):
        if key in result:
            print(f"  {key}: {result[key]}")
    for outcome, count in sorted(result["outcomes"].items()):
        print(f"  {count:6d}  {outcome}")
    for loss in result["losses"][:20]:
        print(f"  LOSS: {loss}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
