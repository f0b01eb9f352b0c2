"""Checkpoint benchmark: durable save and load of a GPT-like AdamW state against torch.save and DCP,
async saves, and resharding a checkpoint to another world size.

Run from the repository root, one command per world size (each adds its part to ``--json``)::

    python -m bench.ckpt                                    # 1 rank: save/load, async save; ~1 minute
    torchrun --nproc-per-node 2 -m bench.ckpt               # 2 ranks, gloo: the same, sharded; ~1-2 minutes
    torchrun --nproc-per-node 3 -m bench.ckpt --reshard     # a 2-rank checkpoint loaded at 3 ranks, CLI 2 -> 3

The state is ``bench.params.TinyGPT`` at the shape of ``gpt_like_shapes()`` (76 tensors, 13,989,888
parameters, GPT-2 initialisation: ``bench.dist.build_model``) with AdamW (lr 1e-3) after one real
step (forward + backward of 1 x 32 tokens per rank, ``step()``), so the state exists: 56 MB of
parameters and 112 MB of ``exp_avg``/``exp_avg_sq``. Every competitor has its own model and
optimizer, built the same way; all run in one process (one torchrun launch), in interleaved rounds
(the first competitor rotating each round), after one untimed round; tables show medians, ratios
are medians over medians, "paired" spreads the p25-p75 of the per-round ratios. At N ranks every
timed operation starts after a barrier and counts as the slowest rank's time.

Save and load (``--dir``, default ``bench/results/ckpt_tmp`` on the repository's disk; each
competitor's previous output is removed, untimed, and ``os.sync()`` run before it saves again):

- ``ours``: ``shardoptim.checkpoint.save(dir, model=, optimizer=)`` (temp file, fsync, rename,
  directory fsync per file; the manifest last) and ``load``; at N ranks ``shardoptim.AdamW(...,
  process_group=WORLD)``, each rank writing and reading its 1/N;
- ``torch.save``: ``torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)`` +
  ``os.fsync``, and ``torch.load(weights_only=True)`` + both ``load_state_dict``; at N ranks as a DDP
  job does it: DDP + ``torch.optim.AdamW`` (replicated), rank 0 saves, every rank loads the file;
- ``dcp``: ``torch.distributed.checkpoint.save``/``load`` (``FileSystemWriter``/``Reader``,
  defaults: fsync per file) of ``get_state_dict(model, opt)``, then ``set_state_dict`` on load; at 1
  rank with ``no_dist=True``; at N ranks two ways: ``dcp ddp`` (the DDP model above, replicated
  state; DCP spreads the replicated tensors over the ranks) and ``dcp fsdp2`` (``fully_shard`` on every
  block and the root, the sharded AdamW state DCP is made for; ``ZeroRedundancyOptimizer`` has no DCP
  state dict);
- ``dd``: ``dd if=/dev/zero bs=1M count=M conv=fdatasync`` on every rank at once, M the MiB of our
  checkpoint divided by N, rounded up: the disk's durable write speed for the same bytes (the
  issue's reference); at N > 1 also ``dd whole``: one dd of all of it, on rank 0.

Reads are from the page cache (the files were just written; dropping the cache would disturb the
machine's other users). Targets (issue 11): ours' save at least 0.8 x dd's throughput; ours' load at
least as fast as torch.load + load_state_dict.

Async save (the ``ours`` model keeps training, 1 x 32 tokens per rank per step): how long
``save(..., async_=True)`` blocks the loop against a synchronous ``save``: until it returns, plus
how long the save's step pre-hook then holds the next ``step()`` for the copy of the optimizer's
shard (``shardoptim/checkpoint/staging.py``; measured between step pre-hooks registered before and
after it); the step times while the background write runs (until the commit) against steps with no
save in flight; and, for reference, a whole host copy before returning (``capture`` and every
tensor into kept buffers) and ``dcp.save`` against ``dcp.async_save`` (1 rank: the plain model; N
ranks: FSDP2). A step counts as "during the write" when the save's background thread was alive, on
some rank, as it started. Target: blocked at most 10 % of the synchronous save.

Resharding (``--reshard``, at N ranks from N - 1; N = 3 for the issue): ranks 0..N-2 train and save
a checkpoint as a sharded optimizer of their own group, all N ranks one of their own. Then, in
rounds: the plain load of the (N-1)-rank checkpoint at N - 1 ranks (rank N-1 waits), its load at N
ranks (resharding on load), the plain load of the N-rank one at N ranks, and on rank 0 the offline
reshard (N-1) -> N: ``world_size.reshard`` in-process, the ``shardoptim reshard`` command line (a new
process: start-up and imports included) and that command's start-up alone (``shardoptim --help``).
Target: the load at N ranks no slower than the plain load at N - 1.

Results go to stdout and, with every sample, to ``--json`` (default ``bench/results/ckpt.json``),
under one key per launch ("1 rank", "2 ranks", "reshard 2->3"); ``--dir`` is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import shardoptim
from bench.ckpt_io import run_dd
from bench.dist import LR, MODEL_SHAPE, build_model
from bench.params import gpt_like_shapes, numel
from bench.step import load_average, machine
from shardoptim import checkpoint
from shardoptim.checkpoint.capture import capture
from shardoptim.checkpoint.staging import HostBuffers
from shardoptim.checkpoint.world_size import reshard

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20
#: Sequences x tokens per rank of every training step.
BATCH = (1, 32)
#: The name of the thread ``save(..., async_=True)`` writes on (shardoptim/checkpoint/writer.py).
SAVE_THREAD = "shardoptim-checkpoint"
#: Issue 11's targets.
SAVE_VS_DD = 0.8
ASYNC_BLOCKED_FRACTION = 0.10


# -- the ranks ----------------------------------------------------------------------------------------


class Ranks:
    """This process's place in the job and the two collectives the timing needs; one rank, with
    collectives that do nothing, when torch.distributed is not initialized."""

    def __init__(self) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maximum over ranks (call on every rank)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()


@dataclass
class Operation:
    """One timed competitor. ``run`` does it once (``self_timed``: and returns the seconds it measured
    itself, dd's own figure); ``outputs`` are removed by rank 0, untimed, before each run; ``ranks``
    take part (None: all), the others wait; ``nbytes``: the bytes it writes, when known beforehand."""

    name: str
    run: Callable[[], Any]
    outputs: Sequence[Path] = ()
    ranks: Sequence[int] | None = None
    nbytes: int = 0
    self_timed: bool = False


def remove(ranks: Ranks, paths: Sequence[Path]) -> None:
    """Rank 0 removes ``paths`` and syncs the disk (untimed: freeing and writing back the old files is
    not part of the next save); every rank calls it."""
    if ranks.rank == 0 and paths:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        os.sync()
    ranks.barrier()


def run_once(ranks: Ranks, op: Operation) -> float:
    """Seconds of one run of ``op`` on the slowest rank taking part; every rank calls it."""
    remove(ranks, op.outputs)
    gc.collect()
    here = op.ranks is None or ranks.rank in op.ranks
    ranks.barrier()
    start = time.perf_counter()
    seconds = 0.0
    if here:
        measured = op.run()
        seconds = time.perf_counter() - start
        if op.self_timed:
            seconds = measured
    return ranks.max([seconds])[0]


def interleaved(ranks: Ranks, groups: dict[str, Sequence[Operation]], reps: int) -> dict[str, list[float]]:
    """``reps`` timed rounds after an untimed one; each round runs every group in turn, its operations in
    an order rotated by one per round. Samples are keyed ``"<group> <operation>"`` (the operation's name
    alone in a group labelled ``""``)."""
    def key(label: str, op: Operation) -> str:
        return f"{label} {op.name}" if label else op.name

    samples: dict[str, list[float]] = {key(label, op): [] for label, group in groups.items() for op in group}
    for round_ in range(reps + 1):
        for label, group in groups.items():
            shift = round_ % len(group)
            for op in [*group[shift:], *group[:shift]]:
                seconds = run_once(ranks, op)
                if round_:
                    samples[key(label, op)].append(seconds)
    return samples


# -- models, optimizers, training -------------------------------------------------------------------


def tokens(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's inputs and targets for one training step."""
    size, length = BATCH
    generator = torch.Generator().manual_seed(1_000_003 * rank + step)
    sequence = torch.randint(MODEL_SHAPE["vocab"], (size, length + 1), generator=generator)
    return sequence[:, :-1], sequence[:, 1:]


@dataclass
class Trainee:
    """A model, the module its forward runs through (DDP or FSDP2 wrap it), and its optimizer."""

    model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    steps: int = 0

    def train_step(self, rank: int) -> None:
        self.forward(*tokens(rank, self.steps)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.steps += 1


def ours(group: dist.ProcessGroup | None) -> Trainee:
    """``shardoptim.AdamW``, sharded over ``group`` when given (it averages the gradients itself)."""
    model = build_model()
    return Trainee(model, model, shardoptim.AdamW(model.parameters(), lr=LR, process_group=group))


def torch_replicated(ranks: Ranks) -> Trainee:
    """``torch.optim.AdamW``; under DDP at N > 1 ranks (the model's only buffer is a constant mask)."""
    model = build_model()
    forward = DistributedDataParallel(model, forward_sync_buffers=False) if ranks.distributed else model
    return Trainee(model, forward, torch.optim.AdamW(model.parameters(), lr=LR))


def torch_fsdp2() -> Trainee:
    """FSDP2 (``fully_shard`` on every block, then the root) and ``torch.optim.AdamW`` on its sharded
    parameters."""
    model = build_model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return Trainee(model, model, torch.optim.AdamW(model.parameters(), lr=LR))


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# -- the competitors ----------------------------------------------------------------------------------


def ours_save(trainee: Trainee, path: Path, **kwargs: Any) -> Callable[[], None]:
    return lambda: checkpoint.save(str(path), model=trainee.model, optimizer=trainee.optimizer, **kwargs)


def ours_load(trainee: Trainee, path: Path) -> Callable[[], None]:
    return lambda: checkpoint.load(str(path), model=trainee.model, optimizer=trainee.optimizer)


def torch_save(ranks: Ranks, trainee: Trainee, path: Path) -> Callable[[], None]:
    def save() -> None:
        if ranks.rank == 0:
            with open(path, "wb") as f:
                torch.save({"model": trainee.model.state_dict(), "optimizer": trainee.optimizer.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
    return save


def torch_load(trainee: Trainee, path: Path) -> Callable[[], None]:
    def load() -> None:
        state = torch.load(path, weights_only=True)
        trainee.model.load_state_dict(state["model"])
        trainee.optimizer.load_state_dict(state["optimizer"])
    return load


def dcp_state(trainee: Trainee) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(trainee.forward, trainee.optimizer)
    return {"model": model_state, "optim": optimizer_state}


def dcp_save(ranks: Ranks, trainee: Trainee, path: Path) -> Callable[[], None]:
    return lambda: dcp.save(dcp_state(trainee), storage_writer=dcp.FileSystemWriter(str(path)),
                            no_dist=not ranks.distributed)


def dcp_async_save(ranks: Ranks, trainee: Trainee, path: Path) -> Future:
    return dcp.async_save(dcp_state(trainee), storage_writer=dcp.FileSystemWriter(str(path)),
                          no_dist=not ranks.distributed)


def dcp_load(ranks: Ranks, trainee: Trainee, path: Path) -> Callable[[], None]:
    def load() -> None:
        state = dcp_state(trainee)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not ranks.distributed)
        set_state_dict(trainee.forward, trainee.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    return load


# -- statistics -----------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"median": values[0], "p25": values[0], "p75": values[0]}
    p25, p50, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": p50, "p25": p25, "p75": p75}


def ratio(numerator: Sequence[float], denominator: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """``scale`` x numerator / denominator: of the medians, and the p25-p75 of the per-round ratios."""
    paired = spread([scale * a / b for a, b in zip(numerator, denominator)])
    return {"of_medians": scale * statistics.median(numerator) / statistics.median(denominator),
            "paired_p25": paired["p25"], "paired_p75": paired["p75"]}


def target(what: str, value: dict[str, float], *, at_least: float | None = None,
           at_most: float | None = None) -> dict[str, Any]:
    met = value["of_medians"] >= at_least if at_least is not None else value["of_medians"] <= at_most
    return {"target": what, "ratio": value, "verdict": "met" if met else "MISSED"}


# -- 1. save and load -----------------------------------------------------------------------------------


def bench_save_load(ranks: Ranks, root: Path, reps: int) -> tuple[dict[str, Any], dict[str, Trainee]]:
    """Durable saves and loads of every competitor, interleaved; also returns the trainees."""
    n, rank = ranks.world_size, ranks.rank
    trainees = {"ours": ours(dist.group.WORLD if ranks.distributed else None), "torch": torch_replicated(ranks)}
    if ranks.distributed:
        trainees["fsdp2"] = torch_fsdp2()
    for trainee in trainees.values():
        trainee.train_step(rank)
    out = {"ours": root / "ours", "torch.save+fsync": root / "torch.pt", "dcp": root / "dcp",
           "dcp fsdp2": root / "dcp-fsdp2"}
    # An untimed save of ours gives the size dd writes.
    run_once(ranks, Operation("sizing", ours_save(trainees["ours"], out["ours"])))
    ours_bytes = directory_bytes(out["ours"])
    dd_mib = math.ceil(ours_bytes / n / MiB)
    dd_paths = [root / f"dd-rank{r}.bin" for r in range(n)]
    dcp_name = "dcp ddp" if n > 1 else "dcp"
    saves = [
        Operation("dd", lambda: run_dd(dd_paths[rank], dd_mib), outputs=dd_paths, nbytes=dd_mib * MiB * n,
                  self_timed=True),
        Operation("ours", ours_save(trainees["ours"], out["ours"]), outputs=[out["ours"]]),
        Operation("torch.save+fsync", torch_save(ranks, trainees["torch"], out["torch.save+fsync"]),
                  outputs=[out["torch.save+fsync"]]),
        Operation(dcp_name, dcp_save(ranks, trainees["torch"], out["dcp"]), outputs=[out["dcp"]]),
    ]
    loads = [
        Operation("ours", ours_load(trainees["ours"], out["ours"])),
        Operation("torch.load", torch_load(trainees["torch"], out["torch.save+fsync"])),
        Operation(dcp_name, dcp_load(ranks, trainees["torch"], out["dcp"])),
    ]
    if n > 1:
        whole = root / "dd-whole.bin"
        saves.append(Operation("dd whole", lambda: run_dd(whole, dd_mib * n), outputs=[whole], ranks=[0],
                               nbytes=dd_mib * MiB * n, self_timed=True))
        saves.append(Operation("dcp fsdp2", dcp_save(ranks, trainees["fsdp2"], out["dcp fsdp2"]),
                               outputs=[out["dcp fsdp2"]]))
        loads.append(Operation("dcp fsdp2", dcp_load(ranks, trainees["fsdp2"], out["dcp fsdp2"])))
    samples = interleaved(ranks, {"save": saves, "load": loads}, reps)

    written = {op.name: op.nbytes or directory_bytes(op.outputs[0]) for op in saves}
    read_from = {"ours": "ours", "torch.load": "torch.save+fsync", dcp_name: dcp_name, "dcp fsdp2": "dcp fsdp2"}
    nbytes = {f"save {name}": size for name, size in written.items()}
    nbytes |= {f"load {op.name}": written[read_from[op.name]] for op in loads}
    save_vs_dd = ratio(samples["save dd"], samples["save ours"], scale=ours_bytes / written["dd"])
    load_vs_torch = ratio(samples["load torch.load"], samples["load ours"])
    result = {
        "state_elements": numel(gpt_like_shapes()), "ours_bytes": ours_bytes, "dd_mib_per_rank": dd_mib,
        "bytes": nbytes, "samples_s": samples, "summary_s": {key: spread(v) for key, v in samples.items()},
        "ratios": {
            f"save ours vs {other} (speed)": ratio(samples[f"save {other}"], samples["save ours"])
            for other in written if other != "ours"
        } | {
            f"load ours vs {other} (speed)": ratio(samples[f"load {other}"], samples["load ours"])
            for other in read_from if other != "ours" and f"load {other}" in samples
        },
        "targets": [
            target(f"ours' save >= {SAVE_VS_DD} x dd (throughput)", save_vs_dd, at_least=SAVE_VS_DD),
            target("ours' load >= torch.load + load_state_dict (speed)", load_vs_torch, at_least=1.0),
        ],
    }
    return result, trainees


# -- 2. async save --------------------------------------------------------------------------------------


def save_thread_alive() -> bool:
    return any(thread.name == SAVE_THREAD and thread.is_alive() for thread in threading.enumerate())


def timed_step(ranks: Ranks, trainee: Trainee) -> float:
    return run_once(ranks, Operation("step", lambda: trainee.train_step(ranks.rank)))


def async_save_round(ranks: Ranks, trainee: Trainee, path: Path, max_steps: int) -> dict[str, Any]:
    """One ``save(..., async_=True)``: the seconds it blocked, then training steps for as long as the
    background write runs on some rank, then ``wait()``."""
    remove(ranks, [path])
    gc.collect()
    stamps: list[float] = []
    stamp = lambda *_: stamps.append(time.perf_counter())  # noqa: E731
    before = trainee.optimizer.register_step_pre_hook(stamp)
    ranks.barrier()
    start = time.perf_counter()
    checkpoint.save(str(path), model=trainee.model, optimizer=trainee.optimizer, async_=True)
    blocked = time.perf_counter() - start
    after = trainee.optimizer.register_step_pre_hook(stamp)  # runs after the save's hook, which holds
    steps = [timed_step(ranks, trainee)]  # the step the save's hook may hold
    before.remove(), after.remove()
    held = stamps[1] - stamps[0]
    while len(steps) < max_steps and ranks.max([float(save_thread_alive())])[0]:
        steps.append(timed_step(ranks, trainee))
    checkpoint.wait()
    committed = time.perf_counter() - start
    blocked, held, total, committed = ranks.max([blocked, held, blocked + held, committed])
    return {"blocked": blocked, "held": held, "total": total, "committed": committed, "steps": steps}


def dcp_async_round(ranks: Ranks, trainee: Trainee, path: Path) -> tuple[float, float]:
    """One ``dcp.async_save``: the seconds until it returned and until its future completed."""
    remove(ranks, [path])
    gc.collect()
    ranks.barrier()
    start = time.perf_counter()
    future = dcp_async_save(ranks, trainee, path)
    blocked = time.perf_counter() - start
    future.result()
    done = time.perf_counter() - start
    blocked, done = ranks.max([blocked, done])
    return blocked, done


def whole_host_copy(ranks: Ranks, trainee: Trainee) -> Callable[[], None]:
    """What a save that copied everything before returning would block for: capture, then every tensor
    into host buffers kept from one copy to the next (``staging.HostBuffers``; the first, untimed round
    faults their pages in)."""
    buffers = HostBuffers()

    def copy() -> None:
        snapshot = capture(rank=ranks.rank, world_size=ranks.world_size, model=trainee.model,
                           optimizer=trainee.optimizer, schedulers=(), ema=None, extra=None)
        buffers.copies(snapshot.shard), buffers.copies(snapshot.shared)
    return copy


def bench_async(ranks: Ranks, root: Path, reps: int, steps: int, trainees: dict[str, Trainee]) -> dict[str, Any]:
    """Sync against async saves of ours while training; dcp.save against dcp.async_save for reference."""
    trainee = trainees["ours"]
    reference = trainees.get("fsdp2", trainees["torch"])
    path, dcp_path = root / "async", root / "async-dcp"
    samples: dict[str, list[float]] = {key: [] for key in (
        "sync save", "async save: returned", "async save: next step held", "async save: blocked (both)",
        "async save: until committed", "whole host copy (kept buffers)",
        "dcp.save", "dcp.async_save: blocked", "dcp.async_save: until done")}
    step_samples: dict[str, list[float]] = {"no save in flight": [], "during an async save": []}
    overlapped: list[int] = []
    copy_all = whole_host_copy(ranks, trainee)
    modes = ["sync", "async", "steps", "host copy", "dcp.save", "dcp.async_save"]
    for round_ in range(reps + 1):
        keep = round_ > 0
        shift = round_ % len(modes)
        for mode in [*modes[shift:], *modes[:shift]]:
            if mode == "sync":
                seconds = run_once(ranks, Operation("sync", ours_save(trainee, path), outputs=[path]))
                samples["sync save"] += [seconds] * keep
            elif mode == "async":
                result = async_save_round(ranks, trainee, path, max_steps=200)
                if keep:
                    samples["async save: returned"].append(result["blocked"])
                    samples["async save: next step held"].append(result["held"])
                    samples["async save: blocked (both)"].append(result["total"])
                    samples["async save: until committed"].append(result["committed"])
                    step_samples["during an async save"] += result["steps"]
                    overlapped.append(len(result["steps"]))
            elif mode == "steps":
                times = [timed_step(ranks, trainee) for _ in range(steps)]
                step_samples["no save in flight"] += times * keep
            elif mode == "host copy":
                seconds = run_once(ranks, Operation("host copy", copy_all))
                samples["whole host copy (kept buffers)"] += [seconds] * keep
            elif mode == "dcp.save":
                seconds = run_once(ranks, Operation("dcp.save", dcp_save(ranks, reference, dcp_path),
                                                    outputs=[dcp_path]))
                samples["dcp.save"] += [seconds] * keep
            else:
                blocked, done = dcp_async_round(ranks, reference, dcp_path)
                if keep:
                    samples["dcp.async_save: blocked"].append(blocked)
                    samples["dcp.async_save: until done"].append(done)
    blocked = ratio(samples["async save: blocked (both)"], samples["sync save"])
    return {
        "dcp_model": "fsdp2" if "fsdp2" in trainees else "plain",
        "samples_s": samples, "summary_s": {key: spread(v) for key, v in samples.items()},
        "step_samples_s": step_samples, "step_summary_s": {key: spread(v) for key, v in step_samples.items() if v},
        "steps_during_each_async_save": overlapped,
        "ratios": {
            "dcp.async_save blocked / dcp.save": ratio(samples["dcp.async_save: blocked"], samples["dcp.save"]),
            "whole host copy / sync save": ratio(samples["whole host copy (kept buffers)"], samples["sync save"]),
        },
        "step_slowdown": (statistics.median(step_samples["during an async save"])
                          / statistics.median(step_samples["no save in flight"])
                          if step_samples["during an async save"] else None),
        "targets": [target(f"async save blocks <= {ASYNC_BLOCKED_FRACTION:.0%} of a sync save", blocked,
                           at_most=ASYNC_BLOCKED_FRACTION)],
    }


# -- 3. resharding --------------------------------------------------------------------------------------


def cli_command() -> list[str]:
    """The ``shardoptim`` console script of this interpreter's environment."""
    script = shutil.which("shardoptim", path=str(Path(sys.executable).parent))
    if script is not None:
        return [script]
    return [sys.executable, "-c", "import sys; from shardoptim.checkpoint.cli import main; sys.exit(main())"]


def run_command(command: list[str]) -> Callable[[], None]:
    return lambda: subprocess.run(command, check=True, capture_output=True)


def bench_reshard(ranks: Ranks, root: Path, reps: int) -> dict[str, Any]:
    """A checkpoint saved at N - 1 ranks loaded at N ranks, against plain loads; offline resharding."""
    n, rank = ranks.world_size, ranks.rank
    m = n - 1
    source_ranks = list(range(m))
    source_group = dist.new_group(source_ranks)  # every rank takes part in creating it
    small = ours(source_group) if rank < m else None
    full = ours(dist.group.WORLD)
    if small is not None:
        small.train_step(rank)
    full.train_step(rank)
    saved_small, saved_full = root / f"saved-at-{m}", root / f"saved-at-{n}"
    if small is not None:
        checkpoint.save(str(saved_small), model=small.model, optimizer=small.optimizer)
    checkpoint.save(str(saved_full), model=full.model, optimizer=full.optimizer)
    ranks.barrier()
    offline, by_cli = root / "resharded", root / "resharded-cli"
    cli = cli_command()
    operations = [
        Operation(f"load at {m} ranks, saved at {m} (plain)",
                  ours_load(small, saved_small) if small is not None else lambda: None, ranks=source_ranks),
        Operation(f"load at {n} ranks, saved at {m} (resharding)", ours_load(full, saved_small)),
        Operation(f"load at {n} ranks, saved at {n} (plain)", ours_load(full, saved_full)),
        Operation(f"world_size.reshard {m} -> {n}, in-process (rank 0)",
                  lambda: reshard(str(saved_small), str(offline), world_size=n), outputs=[offline], ranks=[0]),
        Operation(f"shardoptim reshard {m} -> {n}, command line (rank 0)",
                  run_command([*cli, "reshard", str(saved_small), str(by_cli), "--world-size", str(n), "--quiet"]),
                  outputs=[by_cli], ranks=[0]),
        Operation("shardoptim --help: the command's start-up (rank 0)", run_command([*cli, "--help"]), ranks=[0]),
    ]
    samples = interleaved(ranks, {"": operations}, reps)
    # The command line's output is a checkpoint for N ranks: it must load (untimed).
    checkpoint.load(str(by_cli), model=full.model, optimizer=full.optimizer)
    names = [op.name for op in operations]
    return {
        "from_world_size": m, "to_world_size": n, "bytes_saved_at_m": directory_bytes(saved_small),
        "samples_s": samples, "summary_s": {key: spread(v) for key, v in samples.items()},
        "ratios": {"plain load at n / resharding load at n (speed)": ratio(samples[names[2]], samples[names[1]])},
        "cli_output_loads": True,
        "targets": [target(f"load at {n} of a {m}-rank checkpoint no slower than its plain load at {m} (speed)",
                           ratio(samples[names[0]], samples[names[1]]), at_least=1.0)],
    }


# -- report -----------------------------------------------------------------------------------------------


def table(summary: dict[str, dict[str, float]], nbytes: dict[str, int] | None = None,
          references: dict[str, str] | None = None) -> list[str]:
    """Rows of median and p25-p75 seconds; with ``nbytes``, MB/s and the speed relative to the group's
    reference (first word of the key -> reference key)."""
    lines = [f"{'':56s} {'median s':>9s} {'p25-p75 s':>13s}" + (f" {'MB':>7s} {'MB/s':>7s} {'vs ref':>7s}"
                                                                  if nbytes else "")]
    for key, s in summary.items():
        line = f"{key:56s} {s['median']:9.3f} {s['p25']:6.3f}-{s['p75']:.3f}"
        if nbytes and key in nbytes:
            speed = nbytes[key] / s["median"]
            reference = (references or {}).get(key.split()[0])
            vs = speed / (nbytes[reference] / summary[reference]["median"]) if reference else float("nan")
            line += f" {nbytes[key] / 1e6:7.1f} {speed / 1e6:7.0f} {vs:6.2f}x"
        lines.append(line)
    return lines


def verdicts(targets: Sequence[dict[str, Any]]) -> list[str]:
    return [f"target: {t['target']}: {t['ratio']['of_medians']:.3f} (paired p25-p75 {t['ratio']['paired_p25']:.3f}-"
            f"{t['ratio']['paired_p75']:.3f}): {t['verdict']}" for t in targets]


def report(result: dict[str, Any]) -> list[str]:
    n = result["world_size"]
    lines = [f"{result['key']}: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
             f"{result['threads']} torch thread(s) per rank, {result['reps']} rounds, load average "
             f"{result['load_start']:.2f} -> {result['load_end']:.2f}, {result['seconds']:.0f} s"]
    if "save_load" in result:
        s = result["save_load"]
        lines.append(f"\nsave and load at {n} rank(s), slowest rank: {s['state_elements']:,} parameters + AdamW "
                     f"state, ours' files {s['ours_bytes'] / 1e6:.1f} MB; dd {s['dd_mib_per_rank']} MiB per rank")
        lines += table(s["summary_s"], s["bytes"], {"save": "save dd", "load": "load torch.load"})
        lines.append("(vs ref: throughput relative to dd for saves, to torch.load for loads; >1 is faster)")
        lines += [f"{key}: {r['of_medians']:.2f} (paired {r['paired_p25']:.2f}-{r['paired_p75']:.2f})"
                  for key, r in s["ratios"].items()]
        lines += verdicts(s["targets"])
    if "async" in result:
        a = result["async"]
        lines.append(f"\nasync save at {n} rank(s) (dcp reference: the {a['dcp_model']} model)")
        lines += table(a["summary_s"])
        lines.append("training steps, " + "; ".join(
            f"{key}: median {s['median'] * 1e3:.1f} ms (p25-p75 {s['p25'] * 1e3:.1f}-{s['p75'] * 1e3:.1f}), "
            f"{len(a['step_samples_s'][key])} steps" for key, s in a["step_summary_s"].items()))
        if a["step_slowdown"] is not None:
            lines.append(f"steps during an async save / without: {a['step_slowdown']:.2f}; steps per async save: "
                         f"{a['steps_during_each_async_save']}")
        lines += [f"{key}: {r['of_medians']:.3f} (paired {r['paired_p25']:.3f}-{r['paired_p75']:.3f})"
                  for key, r in a["ratios"].items()]
        lines += verdicts(a["targets"])
    if "reshard" in result:
        r = result["reshard"]
        lines.append(f"\nresharding {r['from_world_size']} -> {r['to_world_size']} ranks, "
                     f"{r['bytes_saved_at_m'] / 1e6:.1f} MB checkpoint, slowest rank")
        lines += table(r["summary_s"])
        lines += [f"{key}: {v['of_medians']:.3f} (paired {v['paired_p25']:.3f}-{v['paired_p75']:.3f})"
                  for key, v in r["ratios"].items()]
        lines.append(f"the command line's output loads at {r['to_world_size']} ranks: {r['cli_output_loads']}")
        lines += verdicts(r["targets"])
    return lines


def write_json(path: Path, key: str, result: dict[str, Any]) -> None:
    """``result`` under ``key`` in the JSON file at ``path``, the other launches' keys kept."""
    everything = json.loads(path.read_text()) if path.exists() else {}
    everything[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(everything, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="timed rounds (after one untimed)")
    parser.add_argument("--steps", type=int, default=5, help="training steps with no save in flight, per round")
    parser.add_argument("--reshard", action="store_true",
                        help="at N >= 2 ranks: the resharding measurement from N - 1 ranks instead")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: as set)")
    parser.add_argument("--dir", type=Path, default=RESULTS / "ckpt_tmp", help="where checkpoints go (removed after)")
    parser.add_argument("--json", type=Path, default=RESULTS / "ckpt.json", help="where results go")
    args = parser.parse_args(argv)
    # dcp at 1 rank runs with no_dist=True, and still warns on every call that it assumes one process.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ranks = Ranks()
    if args.reshard and ranks.world_size < 2:
        parser.error("--reshard needs at least 2 ranks: torchrun --nproc-per-node 3 -m bench.ckpt --reshard")
    n = ranks.world_size
    key = f"reshard {n - 1}->{n}" if args.reshard else f"{n} rank" + ("s" if n > 1 else "")
    if args.threads is not None:
        key += f", --threads {args.threads}"
    root = args.dir.resolve()
    if ranks.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    ranks.barrier()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "key": key, "world_size": n, "backend": str(dist.get_backend()) if ranks.distributed else None,
        "threads": torch.get_num_threads(), "reps": args.reps, "steps": args.steps, "batch_per_rank": BATCH,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
        "dir": str(root), "load_start": load_average(), "model": MODEL_SHAPE, "lr": LR,
    }
    try:
        if args.reshard:
            result["reshard"] = bench_reshard(ranks, root, args.reps)
        else:
            result["save_load"], trainees = bench_save_load(ranks, root, args.reps)
            result["async"] = bench_async(ranks, root, args.reps, args.steps, trainees)
        result["load_end"] = load_average()
        result["seconds"] = time.perf_counter() - started
        if ranks.rank == 0:
            print("\n".join(report(result)), flush=True)
            write_json(args.json, key, result)
            print(f"\nwritten to {args.json} under {key!r}", flush=True)
    finally:
        checkpoint.wait()
        ranks.barrier()
        if ranks.rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        if ranks.distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
