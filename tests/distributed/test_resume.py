"""launch/train.py's checkpoints under real torchrun launches (2 gloo ranks on loopback): a run that
stops, or loses a rank to a real SIGKILL and is restarted by ``torchrun --max-restarts 1``, resumes from
its latest checkpoint and ends in exactly the state of a run that was never interrupted.

The runs are tiny (one block of width 32, 30 steps) but keep dropout and a ShardedEMA, so what must come
back includes every rank's torch generator and the EMA besides the model, the optimizer's shards, the
schedule and the loop's position. Each run writes its final state (``--final-state``: the model, the
gathered optimizer state, the EMA weights, the learning rate) and the tests compare them bit for bit.
"""

from __future__ import annotations

import re

import pytest

import shardoptim.checkpoint

from .elastic import assert_same_state, final_state, logged_losses, torchrun

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[tuple[dict, dict], str]:
    """The reference: the same run in one go, without checkpoints; its final state and its output."""
    path = tmp_path_factory.mktemp("uninterrupted") / "final.safetensors"
    run = torchrun("--final-state", str(path))
    assert sorted(logged_losses(run.stdout)) == [10, 20, 30]
    return final_state(path), run.stdout


def test_stopped_run_resumes_bit_for_bit(tmp_path, uninterrupted):
    """Stopped after step 14 (between two log lines, so a loss window is half full), resumed to 30."""
    reference, reference_output = uninterrupted
    ckpt = tmp_path / "ckpt"
    first = torchrun("--ckpt-dir", str(ckpt), "--save-every", "6", "--stop-at-step", "14")
    assert "no checkpoint under" in first.stdout
    assert "stopped after step 14 of 30" in first.stdout
    assert shardoptim.checkpoint.latest(str(ckpt)) == str(ckpt / "step-000000000014")
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000000012", "step-000000000014"]  # --keep 2

    second = torchrun("--ckpt-dir", str(ckpt), "--save-every", "6", "--final-state", str(tmp_path / "final.safetensors"))
    assert f"resumed from {ckpt / 'step-000000000014'}: step 14 of 30, saved by 2 rank(s)" in second.stdout
    assert_same_state(tmp_path / "final.safetensors", reference)
    assert logged_losses(second.stdout) == logged_losses(reference_output, after=14)
    assert re.search(r"loss \S+ -> \S+", second.stdout).group() == re.search(r"loss \S+ -> \S+", reference_output).group()


@pytest.mark.parametrize("saving", ["sync", "async"])
def test_rank_killed_under_torchrun_restarts_and_resumes_bit_for_bit(tmp_path, uninterrupted, saving):
    """Rank 1 SIGKILLs itself in step 15; torchrun restarts both ranks, which resume from step 12 (with
    --async-save, from 12 or 6: the save of step 12 may still have been in flight)."""
    reference, reference_output = uninterrupted
    ckpt = tmp_path / "ckpt"
    run = torchrun("--ckpt-dir", str(ckpt), "--save-every", "6", "--kill-at-step", "15",
                   "--final-state", str(tmp_path / "final.safetensors"),
                   *(["--async-save"] if saving == "async" else []), max_restarts=1)
    assert "rank 1: simulated preemption in step 15: SIGKILL" in run.stdout
    assert re.search(r"exitcode: -9\b.*local_rank: 1", run.stderr), run.stderr  # torchrun saw the SIGKILL
    assert run.stdout.count("no checkpoint under") == 1  # the first attempt only
    resumed = re.search(rf"resumed from {re.escape(str(ckpt))}/step-0*(\d+): step (\d+) of 30, saved by 2 rank\(s\)",
                        run.stdout)
    assert resumed and resumed.group(1) == resumed.group(2), run.stdout
    step = int(resumed.group(1))
    assert step == 12 if saving == "sync" else step in (6, 12)
    assert_same_state(tmp_path / "final.safetensors", reference)
    assert logged_losses(run.stdout[resumed.end():]) == logged_losses(reference_output, after=step)
    assert shardoptim.checkpoint.latest(str(ckpt)) == str(ckpt / "step-000000000030")


def test_a_muon_adamw_run_killed_under_torchrun_resumes_bit_for_bit(tmp_path):
    """The README's transformer with Muon on its hidden matrices and AdamW on the rest: rank 1 killed
    in step 15, restarted, resumed from step 12, ending where the uninterrupted run ends."""
    reference = tmp_path / "uninterrupted.safetensors"
    first = torchrun("--optimizer", "MuonAdamW", "--final-state", str(reference))
    losses = [float(loss) for loss in logged_losses(first.stdout).values()]
    assert losses[-1] < losses[0], f"MuonAdamW did not train: {losses}"
    ckpt = tmp_path / "ckpt"
    run = torchrun("--optimizer", "MuonAdamW", "--ckpt-dir", str(ckpt), "--save-every", "6", "--kill-at-step", "15",
                   "--final-state", str(tmp_path / "final.safetensors"), max_restarts=1)
    assert f"resumed from {ckpt / 'step-000000000012'}: step 12 of 30" in run.stdout
    assert_same_state(tmp_path / "final.safetensors", final_state(reference))
