"""A process saving checkpoints is killed with SIGKILL at random moments: the newest complete
checkpoint is always found, loads and verifies, on local disk and on the S3 endpoint."""

from __future__ import annotations

import os

import pytest

from .crash_saver import check_latest, kill_while_saving

TRIALS = {"local": 4, "s3": 2}  # bench/reliability.py runs the long version


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_latest_is_always_complete_after_a_kill(backend, tmp_path, request):
    options = request.getfixturevalue("s3_endpoint") if backend == "s3" else {}
    for trial in range(TRIALS[backend]):
        root = str(tmp_path / f"run{trial}") if backend == "local" else f"s3://shardoptim-tests/crash-{os.getpid()}-{trial}"
        check_latest(root, options, kill_while_saving(root, options, seed=trial))
