"""Running launch/train.py under torchrun (2 gloo ranks on loopback) and comparing how runs ended:
shared by tests/distributed/test_resume.py and bench/reliability.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from .world import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS = 30
TINY = ["--steps", str(STEPS), "--log-every", "10", "--sample", "0", "--d-model", "32", "--layers", "1",
        "--batch-size", "8", "--seq-len", "32", "--sentences", "300", "--dropout", "0.1", "--ema", "0.9"]
LOSS_LINE = re.compile(r"^step +(\d+)/\d+  loss (\d+\.\d+)", re.MULTILINE)


def torchrun(*args: str, max_restarts: int = 0) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 launch/train.py TINY args``; it must exit 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "--max-restarts", str(max_restarts), str(ROOT / "launch" / "train.py"), *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, f"exit status {run.returncode}\n{run.stdout}\n{run.stderr}"
    return run


def final_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


def assert_same_state(path: Path, reference: tuple[dict[str, torch.Tensor], dict[str, str]]) -> None:
    tensors, metadata = final_state(path)
    expected, expected_metadata = reference
    assert tensors.keys() == expected.keys()
    assert metadata == expected_metadata  # learning rates, param groups, EMA update count
    differ = {key: (tensors[key].double() - value.double()).abs().max().item()
              for key, value in expected.items()
              if tensors[key].dtype != value.dtype or not torch.equal(tensors[key], value)}
    first = dict(sorted(differ.items())[:6])
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ; max abs differences, first ones: {first}"


def logged_losses(output: str, after: int = 0) -> dict[int, str]:
    return {int(step): loss for step, loss in LOSS_LINE.findall(output) if int(step) > after}
