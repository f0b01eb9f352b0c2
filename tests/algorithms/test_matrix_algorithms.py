"""Muon and Adafactor in one process against torch.optim's, bit for bit, over their options, param
groups and dtypes; their errors; state dicts both ways; what is not updated."""

from __future__ import annotations

import copy

import pytest
import torch

import shardoptim
from tests.algorithms.cases import options
from tests.oracle import make_params, run_side_by_side

MATRICES = ((7, 5), (5, 3), (4, 9), (16, 16))
MIXED = ((7, 5), (5,), (3, 4, 2), (), (33,))

MUON_OPTIONS = [dict(lr=0.02, **kw) for kw in options(
    nesterov=(True, False), ns_steps=(5, 2), adjust_lr_fn=(None, "original", "match_rms_adamw"),
    weight_decay=(0.1, 0.0), momentum=(0.95, 0.5))]
ADAFACTOR_OPTIONS = [dict(lr=0.05, **kw) for kw in options(
    beta2_decay=(-0.8, -0.5), eps=((None, 1e-3), (1e-6, 1e-2)), d=(1.0, 2.0), weight_decay=(0.0, 0.1),
    maximize=(False, True))]


def _id(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr")


def _exactly(ours, theirs, our_opt, their_opt):
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"parameter {index} differs by {(a - b).abs().max()}"
    mine, torch_state = our_opt.state_dict(), their_opt.state_dict()
    assert mine["param_groups"] == torch_state["param_groups"]
    assert mine["state"].keys() == torch_state["state"].keys()
    for index, entry in torch_state["state"].items():
        assert mine["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert mine["state"][index][key].dtype == value.dtype and torch.equal(mine["state"][index][key], value), (
                index, key)


def _groups(params, lr):
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kwargs", MUON_OPTIONS, ids=_id)
def test_muon_matches_torch_bit_for_bit(kwargs, dtype):
    _exactly(*run_side_by_side(lambda ps: shardoptim.Muon(_groups(ps, kwargs["lr"]), **kwargs),
                               lambda ps: torch.optim.Muon(_groups(ps, kwargs["lr"]), **kwargs),
                               steps=12, dtype=dtype, shapes=MATRICES, skip=lambda step, i: i == 1 and step % 3 == 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kwargs", ADAFACTOR_OPTIONS, ids=_id)
def test_adafactor_matches_torch_bit_for_bit(kwargs, dtype):
    _exactly(*run_side_by_side(lambda ps: shardoptim.Adafactor(_groups(ps, kwargs["lr"]), **kwargs),
                               lambda ps: torch.optim.Adafactor(_groups(ps, kwargs["lr"]), **kwargs),
                               steps=12, dtype=dtype, shapes=MIXED, skip=lambda step, i: i == 1 and step % 3 == 1))


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_a_tensor_lr_changed_between_steps_follows_torch(name):
    def between(step, ours, theirs):
        for group in (*ours.param_groups, *theirs.param_groups):
            group["lr"].fill_(0.01 * (1 + step % 3))

    _exactly(*run_side_by_side(lambda ps: getattr(shardoptim, name)(ps, lr=torch.tensor(0.01)),
                               lambda ps: getattr(torch.optim, name)(ps, lr=torch.tensor(0.01)),
                               steps=8, shapes=MATRICES, between=between))


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_state_dicts_move_between_ours_and_torch_both_ways(name):
    shapes = MATRICES
    ours, theirs = make_params(shapes=shapes), make_params(shapes=shapes)
    our_opt, their_opt = getattr(shardoptim, name)(ours, lr=0.02), getattr(torch.optim, name)(theirs, lr=0.02)
    for step in range(3):
        for a, b in zip(ours, theirs):
            a.grad = b.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step))
        our_opt.step()
        their_opt.step()
    into_torch = getattr(torch.optim, name)(copy.deepcopy(theirs), lr=0.02)
    into_torch.load_state_dict(copy.deepcopy(our_opt.state_dict()))
    into_ours = getattr(shardoptim, name)(make_params(shapes=shapes), lr=0.02)
    into_ours.load_state_dict(copy.deepcopy(their_opt.state_dict()))
    copied = copy.deepcopy(our_opt)
    for candidate in (into_torch, into_ours, copied):
        _exactly(ours, theirs, our_opt, their_opt)
        assert candidate.state_dict()["state"].keys() == their_opt.state_dict()["state"].keys()


def test_parameters_without_gradients_get_no_state_and_stay():
    params = make_params(shapes=MATRICES)
    before = [p.detach().clone() for p in params]
    opt = shardoptim.Muon(params)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert list(opt.state) == [params[0]]
    assert all(torch.equal(p, b) for p, b in zip(params[1:], before[1:]))


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_complex_and_sparse_are_refused_as_torch_refuses_them(name):
    for make in (lambda: torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)),):
        ours, theirs = make(), make()
        for param, cls in ((ours, getattr(shardoptim, name)), (theirs, getattr(torch.optim, name))):
            param.grad = torch.ones_like(param)
        with pytest.raises(RuntimeError) as torch_error:
            getattr(torch.optim, name)([theirs]).step()
        with pytest.raises(RuntimeError, match=str(torch_error.value)):
            getattr(shardoptim, name)([ours]).step()
    param = torch.nn.Parameter(torch.randn(6, 4))
    opt = getattr(shardoptim, name)([param])
    param.grad = torch.randn(6, 4).to_sparse()
    with pytest.raises(RuntimeError, match=f"{name} does not support sparse gradients"):
        opt.step()


def test_muon_refuses_what_is_not_a_matrix_with_torchs_message():
    with pytest.raises(ValueError) as torch_error:
        torch.optim.Muon([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match=str(torch_error.value).replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        shardoptim.Muon([torch.nn.Parameter(torch.randn(3))])


def test_the_memory_report_counts_the_state_and_the_balance():
    params = make_params(shapes=MIXED)
    opt = shardoptim.Adafactor(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    held = sum(t.numel() * t.element_size() for entry in opt.state.values() for t in entry.values())
    report = opt.memory_report()
    assert report.ranks[0].state == held  # what the state tensors take, as the layouts predict it
    assert report.largest_cost_share == 1.0
