"""A process saving checkpoints is killed with SIGKILL at random moments: the newest complete
checkpoint is always found, loads and verifies, on local disk and on the S3 endpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import shardoptim
from shardoptim import checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
TRIALS = {"local": 4, "s3": 2}  # bench/reliability.py runs the long version


def _kill_while_saving(root: str, options: dict, seed: int) -> int:
    """Start the saver, kill it at a random moment after its first save began; the last step it reported."""
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


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_latest_is_always_complete_after_a_kill(backend, tmp_path, request):
    options = request.getfixturevalue("s3_endpoint") if backend == "s3" else {}
    for trial in range(TRIALS[backend]):
        root = str(tmp_path / f"run{trial}") if backend == "local" else f"s3://shardoptim-tests/crash-{os.getpid()}-{trial}"
        reported = _kill_while_saving(root, options, seed=trial)
        url = checkpoint.latest(root, storage_options=options)
        if reported < 0 and url is None:
            continue  # killed before the first commit: nothing to find, and nothing found
        assert url is not None, f"trial {trial}: step {reported} was reported committed, latest() found nothing"
        opened = checkpoint.open_checkpoint(url, storage_options=options)
        assert opened.manifest.step >= reported, "the newest commit is found"
        opened.verify()
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 256))
        opt = shardoptim.AdamW(model.parameters())
        extra = checkpoint.load(url, model=model, optimizer=opt, storage_options=options)
        assert extra == {"step": opened.manifest.step}
