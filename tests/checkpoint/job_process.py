"""A training job's checkpoint traffic in its own process, for the fault tests that need two jobs at once.

``python -m tests.checkpoint.job_process save ROOT STEPS KEEP [STOP_FILE]``: saves steps 1..STEPS
(or until STOP_FILE exists) under ROOT with a ``CheckpointManager(keep_last=KEEP)``, every parameter
filled with the step number, and prints one JSON line: the steps it committed, its run id and the
error that stopped it, if any.

``python -m tests.checkpoint.job_process restore ROOT COUNT STOP_FILE``: restores the newest
checkpoint COUNT times, each with a fresh manager, checking that every parameter holds the step its
``extra`` names (no mixture of two checkpoints); then creates STOP_FILE and prints one JSON line: how
many restores had to retry because the checkpoint went away while it was read.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

import shardoptim
from shardoptim import checkpoint


#: The "training" between two saves: a job saves after some work, not back to back (a reader racing
#: a saver that deletes its last checkpoint the moment it commits the next would starve).
STEP_SECONDS = 0.02


def build() -> tuple[nn.Module, shardoptim.AdamW]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    opt = shardoptim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return model, opt


def save_steps(root: str, steps: int, keep: int, stop_file: str | None = None) -> dict:
    model, opt = build()
    manager = checkpoint.CheckpointManager(root, keep_last=keep)
    done, error = [], None
    for step in range(1, steps + 1):
        if stop_file is not None and Path(stop_file).exists():
            break
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(step)
        try:
            manager.save(step, model=model, optimizer=opt, extra={"step": step})
        except Exception as caught:  # noqa: BLE001 - reported to the test
            error = f"{type(caught).__name__}: {caught}"
            break
        done.append(step)
        time.sleep(STEP_SECONDS)
    return {"committed": done, "run": manager.run, "error": error}


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "went away while it was read" in record.getMessage()


def restore_repeatedly(root: str, count: int, stop_file: str) -> dict:
    model, opt = build()
    retries = _Retries()
    logging.getLogger("shardoptim.checkpoint.manager").addHandler(retries)
    steps = []
    while len(steps) < count:
        extra = checkpoint.CheckpointManager(root).restore(model=model, optimizer=opt)
        if extra is None:
            continue
        for name, param in model.named_parameters():
            if not torch.all(param == extra["step"]):
                raise AssertionError(f"{name} does not hold step {extra['step']}: a torn restore")
        steps.append(extra["step"])
    Path(stop_file).touch()
    return {"steps": steps, "retries": retries.count}


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, root, *rest = sys.argv[1:]
    if mode == "save":
        result = save_steps(root, int(rest[0]), int(rest[1]), *rest[2:])
    else:
        result = restore_repeatedly(root, int(rest[0]), rest[1])
    print(json.dumps(result), flush=True)
