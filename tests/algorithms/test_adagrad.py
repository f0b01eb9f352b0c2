"""Adagrad beyond the generic table: state that exists from construction on."""

from __future__ import annotations

import torch

import shardoptim
from tests.algorithms.cases import groups
from tests.oracle import assert_same_state, assert_same_trajectory, make_params, run_side_by_side


def test_adagrad_state_exists_from_construction_as_in_torch():
    ours = shardoptim.Adagrad(groups("Adagrad", make_params()), initial_accumulator_value=0.3)
    theirs = torch.optim.Adagrad(groups("Adagrad", make_params()), initial_accumulator_value=0.3)
    assert_same_state(ours.state_dict(), theirs.state_dict())


def test_adagrad_honours_a_per_group_initial_accumulator_value():
    params = make_params()
    opt = shardoptim.Adagrad([{"params": params[:2]}, {"params": params[2:], "initial_accumulator_value": 0.7}],
                             initial_accumulator_value=0.2)
    assert torch.equal(opt.state[params[0]]["sum"], torch.full_like(params[0], 0.2))
    assert torch.equal(opt.state[params[2]]["sum"], torch.full_like(params[2], 0.7))


def test_adagrad_share_memory_keeps_training():
    ours, theirs, our_opt, _ = run_side_by_side(
        lambda ps: shardoptim.Adagrad(ps, lr=0.05), lambda ps: torch.optim.Adagrad(ps, lr=0.05, foreach=False),
        between=lambda step, ours, theirs: ours.share_memory() if step == 3 else None,
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert all(entry["sum"].is_shared() for entry in our_opt.state.values())
