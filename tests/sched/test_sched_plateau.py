"""ReduceLROnPlateau against torch's on metric sequences with plateaus, noise and improvements."""

from __future__ import annotations

import math

import pytest
import torch
import torch.optim.lr_scheduler as theirs

import shardoptim.sched as ours
from tests.sched.sched_oracle import RTOL, assert_same_groups, json_round_trip, make_optimizer

# Improves in steps, with a wobble on the plateaus, and gets worse for a while in the middle.
METRICS = [
    1.0 / (1 + epoch // 9) + 0.004 * ((epoch * 37) % 11) / 11 + (0.3 if 80 <= epoch < 110 else 0.0)
    for epoch in range(200)
]

SETTINGS = [
    {},
    {"patience": 2},
    {"mode": "max", "patience": 3},
    {"threshold_mode": "abs", "threshold": 0.01, "patience": 2, "cooldown": 3},
    {"mode": "max", "threshold_mode": "abs", "threshold": 0.002, "patience": 1, "cooldown": 1, "factor": 0.5},
    {"patience": 0, "factor": 0.5, "min_lr": [0.01, 0.001]},
    {"threshold": 0.1, "cooldown": 5, "patience": 1, "min_lr": 0.005, "factor": 0.7},
    {"patience": 0, "factor": 0.9, "eps": 2e-3},
]


def _metric(epoch: int, mode: str) -> float:
    return METRICS[epoch] if mode == "min" else -METRICS[epoch]


def _assert_same(mine: ours.ReduceLROnPlateau, ref: theirs.ReduceLROnPlateau, where: str) -> None:
    assert_same_groups(mine.optimizer, ref.optimizer, where)
    for key in ("last_epoch", "num_bad_epochs", "cooldown_counter", "min_lrs"):
        assert getattr(mine, key) == getattr(ref, key), f"{where}: {key}"
    assert mine.best == ref.best
    last_lrs = zip(mine.get_last_lr(), ref.get_last_lr(), strict=True)
    assert all(math.isclose(float(a), float(b), rel_tol=RTOL) for a, b in last_lrs)


def _run(mine, ref, epochs: range, mode: str, as_tensor: bool = False) -> None:
    for epoch in epochs:
        metric = _metric(epoch, mode)
        for scheduler in (mine, ref):
            scheduler.optimizer.step()
            scheduler.step(torch.tensor(metric) if as_tensor else metric)
        _assert_same(mine, ref, f"epoch {epoch}")


@pytest.mark.parametrize("kwargs", SETTINGS, ids=str)
def test_matches_torch(kwargs: dict) -> None:
    mine = ours.ReduceLROnPlateau(make_optimizer(), **kwargs)
    ref = theirs.ReduceLROnPlateau(make_optimizer(), **kwargs)
    _run(mine, ref, range(200), kwargs.get("mode", "min"))
    assert mine.optimizer.param_groups[0]["lr"] < 0.1  # the sequence did trigger reductions


@pytest.mark.parametrize("kwargs", SETTINGS[::2], ids=str)
def test_tensor_lr_and_tensor_metric(kwargs: dict) -> None:
    mine = ours.ReduceLROnPlateau(make_optimizer(lr=torch.tensor), **kwargs)
    ref = theirs.ReduceLROnPlateau(make_optimizer(lr=torch.tensor), **kwargs)
    tensors = [group["lr"] for group in mine.optimizer.param_groups]
    _run(mine, ref, range(200), kwargs.get("mode", "min"), as_tensor=True)
    assert all(group["lr"] is t for group, t in zip(mine.optimizer.param_groups, tensors, strict=True))


@pytest.mark.parametrize("source", ["ours", "torch"])
@pytest.mark.parametrize("kwargs", SETTINGS, ids=str)
def test_state_dict_round_trip_midway(kwargs: dict, source: str) -> None:
    mine = ours.ReduceLROnPlateau(make_optimizer(), **kwargs)
    ref = theirs.ReduceLROnPlateau(make_optimizer(), **kwargs)
    mode = kwargs.get("mode", "min")
    _run(mine, ref, range(95), mode)
    saved = mine if source == "ours" else ref
    state = json_round_trip(saved.state_dict()) if source == "ours" else saved.state_dict()
    fresh = ours.ReduceLROnPlateau(make_optimizer())  # defaults: everything comes from the state
    fresh.optimizer.load_state_dict(saved.optimizer.state_dict())
    fresh.load_state_dict(state)
    _run(fresh, ref, range(95, 200), mode)


def test_loading_a_bad_mode_is_rejected() -> None:
    scheduler = ours.ReduceLROnPlateau(make_optimizer())
    with pytest.raises(ValueError):
        scheduler.load_state_dict({**scheduler.state_dict(), "mode": "sideways"})


@pytest.mark.parametrize("min_lr", [0.001, [0.001, 0.002]])
def test_group_added_later_like_torch(min_lr) -> None:
    """A scalar min_lr extends to a new group; a per-group list cannot, and says so."""
    outcomes = []
    for lib in (ours, theirs):
        opt = make_optimizer()
        scheduler = lib.ReduceLROnPlateau(opt, patience=0, min_lr=min_lr)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
        scheduler.step(1.0)
        try:
            scheduler.step(2.0)
            outcomes.append([group["lr"] for group in opt.param_groups])
        except RuntimeError:
            outcomes.append(RuntimeError)
    assert outcomes[0] == outcomes[1]


def test_epoch_argument_is_deprecated_like_torch() -> None:
    for lib in (ours, theirs):
        scheduler = lib.ReduceLROnPlateau(make_optimizer())
        with pytest.warns(UserWarning, match="The epoch parameter in `scheduler.step\\(\\)`"):
            scheduler.step(1.0, epoch=5)
        assert scheduler.last_epoch == 5
