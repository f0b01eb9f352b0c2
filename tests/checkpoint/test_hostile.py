"""Hostile checkpoints refused cleanly: a fuzz of a real checkpoint's manifest and headers, run in
a process with an address-space limit (an allocation proportional to a claimed size would fail)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CASES = 300  # bench/reliability.py runs thousands


@pytest.mark.parametrize("seed", [11, 12])
def test_mutated_checkpoints_load_or_are_refused_cleanly_and_change_nothing(tmp_path, seed):
    run = subprocess.run(
        [sys.executable, "-m", "tests.checkpoint.fuzz", str(tmp_path), str(CASES), str(seed)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["problems"] == [], "\n".join(summary["problems"][:20])
    assert sum(summary["outcomes"].values()) == CASES
    refused = sum(count for outcome, count in summary["outcomes"].items() if outcome.startswith("refused"))
    assert refused > CASES // 2, f"most mutations must be caught: {summary['outcomes']}"
