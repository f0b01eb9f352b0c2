"""A training process for the crash tests: saves checkpoint after checkpoint until it is killed.

``python -m tests.checkpoint.crash_saver ROOT STORAGE_OPTIONS_JSON``: prints ``ready`` once it is
about to save for the first time, then ``committed <step>`` after each commit.
``kill_while_saving`` runs it and kills it at a random moment; ``check_latest`` is what must hold
afterwards (tests/checkpoint/test_crash.py runs a few trials, bench/reliability.py many).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import shardoptim
from shardoptim import checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


def build() -> tuple[torch.nn.Module, shardoptim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 256))
    return model, shardoptim.AdamW(model.parameters(), lr=1e-3)


def main() -> None:
    root, options = sys.argv[1], json.loads(sys.argv[2])
    model, opt = build()
    manager = checkpoint.CheckpointManager(root, keep_last=2, storage_options=options)
    print("ready", flush=True)
    for step in range(1_000_000):
        model(torch.randn(8, 256)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        manager.save(step, model=model, optimizer=opt, extra={"step": step})
        print(f"committed {step}", flush=True)


def kill_while_saving(root: str, options: dict, seed: int) -> int:
    """Start the saver, SIGKILL it at a random moment after its first save began; the last step it
    reported committed (-1 for none)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint.crash_saver", root, json.dumps(options)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.stdout.readline().strip() == "ready"
    time.sleep(random.Random(seed).uniform(0.05, 1.5))
    process.send_signal(signal.SIGKILL)
    output = process.communicate(timeout=30)[0]
    steps = [int(line.split()[1]) for line in output.splitlines() if line.startswith("committed")]
    return steps[-1] if steps else -1


def check_latest(root: str, options: dict, reported: int) -> str:
    """After a kill: ``latest()`` is a complete checkpoint at least as new as the last reported
    commit, which verifies and loads. Returns "none" (killed before any commit) or "loaded";
    raises AssertionError on a lost or damaged checkpoint."""
    url = checkpoint.latest(root, storage_options=options)
    if reported < 0 and url is None:
        return "none"
    assert url is not None, f"step {reported} was reported committed, latest() found nothing"
    opened = checkpoint.open_checkpoint(url, storage_options=options)
    assert opened.manifest.step >= reported, "the newest commit is found"
    opened.verify()
    model, opt = build()
    extra = checkpoint.load(url, model=model, optimizer=opt, storage_options=options)
    assert extra == {"step": opened.manifest.step}
    return "loaded"


if __name__ == "__main__":
    main()
