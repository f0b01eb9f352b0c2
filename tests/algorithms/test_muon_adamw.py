"""MuonAdamW in one process: exactly torch.optim.Muon on the Muon groups and torch.optim.AdamW on the
rest, stepped together; muon_param_groups' split; schedulers, EMA and state dicts over both kinds."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import shardoptim


class Net(nn.Module):
    """An embedding tied to the head, hidden matrices, biases and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.l1 = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.l2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.l2(self.ln(torch.relu(self.l1(self.embed(tokens))))))


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(step))


def _train(model, opts, steps, schedulers=()):
    for step in steps:
        model(_batch(step)).pow(2).mean().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for scheduler in schedulers:
            scheduler.step()


def test_the_split_puts_hidden_matrices_under_muon_and_the_rest_under_adamw():
    groups = shardoptim.muon_param_groups(Net())
    assert [(g["use_muon"], g["param_names"]) for g in groups] == [
        (True, ["l1.weight", "l2.weight"]),
        (False, ["embed.weight", "l1.bias", "ln.weight", "ln.bias", "l2.bias"]),  # the tied head is listed once
    ]
    custom = shardoptim.muon_param_groups(Net(), adamw_names=lambda name: name.startswith("l2"), muon={"lr": 0.5})
    assert custom[0]["param_names"] == ["l1.weight"] and custom[0]["lr"] == 0.5


@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}], ids=["for-loop", "foreach"])
def test_each_group_steps_exactly_as_torchs_algorithm_does(flags):
    torch.manual_seed(0)
    ours, theirs = Net(), None
    theirs = copy.deepcopy(ours)
    opt = shardoptim.MuonAdamW(shardoptim.muon_param_groups(ours, muon={"lr": 0.02}, adamw={"lr": 3e-3, **flags}))
    muon_group, adamw_group = shardoptim.muon_param_groups(theirs)
    torch_opts = [torch.optim.Muon(muon_group["params"], lr=0.02),
                  torch.optim.AdamW(adamw_group["params"], lr=3e-3, **flags)]
    schedulers = [shardoptim.sched.CosineAnnealingLR(opt, T_max=6)]
    torch_schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6) for o in torch_opts]
    _train(ours, [opt], range(6), schedulers)
    _train(theirs, torch_opts, range(6), torch_schedulers)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
    state = opt.state_dict()
    muon_state, adamw_state = (o.state_dict()["state"] for o in torch_opts)
    assert sorted(state["state"]) == list(range(len(muon_state) + len(adamw_state)))
    for index, entry in muon_state.items():
        assert torch.equal(state["state"][index]["momentum_buffer"], entry["momentum_buffer"])
    for index, entry in adamw_state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["state"][len(muon_state) + index][key], entry[key]), key
    assert [g["lr"] for g in opt.param_groups] == [o.param_groups[0]["lr"] for o in torch_opts]


def test_state_dict_and_deepcopy_continue_the_run_exactly():
    torch.manual_seed(0)
    model = Net()
    opt = shardoptim.MuonAdamW(shardoptim.muon_param_groups(model))
    _train(model, [opt], range(3))
    reloaded_model = copy.deepcopy(model)
    reloaded = shardoptim.MuonAdamW(shardoptim.muon_param_groups(reloaded_model))
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin = copy.deepcopy({"model": model, "opt": opt})
    _train(model, [opt], range(3, 6))
    _train(reloaded_model, [reloaded], range(3, 6))
    _train(twin["model"], [twin["opt"]], range(3, 6))
    for a, b, c in zip(model.parameters(), reloaded_model.parameters(), twin["model"].parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_sharded_ema_averages_both_kinds_of_groups_as_torchs_averaged_model():
    torch.manual_seed(0)
    model = Net()
    reference = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.8), use_buffers=False)
    opt = shardoptim.MuonAdamW(shardoptim.muon_param_groups(model))
    ema = shardoptim.ema.ShardedEMA(opt, decay=0.8)
    for step in range(4):
        _train(model, [opt], range(step, step + 1))
        ema.update()
        reference.update_parameters(model)
    with ema.averaged():
        averaged = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, p in reference.module.named_parameters():
        torch.testing.assert_close(averaged[name], p.detach(), msg=name)


def test_bad_groups_and_arguments_are_named():
    model = Net()
    with pytest.raises(ValueError, match="needs 'use_muon'"):
        shardoptim.MuonAdamW(model.parameters())
    with pytest.raises(TypeError, match="'use_muon' must be True or False"):
        shardoptim.MuonAdamW([{"params": [model.l1.weight], "use_muon": 1}])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        shardoptim.MuonAdamW([{"params": [model.l1.bias], "use_muon": True}])
    with pytest.raises(ValueError, match="Learning rate should be >= 0 but is: -1"):  # Muon's message
        shardoptim.MuonAdamW([{"params": [model.l1.weight], "use_muon": True, "lr": -1}])
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0: 1.5"):  # AdamW's message
        shardoptim.MuonAdamW([{"params": [model.l1.bias], "use_muon": False, "betas": (1.5, 0.9)}])
    with pytest.raises(TypeError, match="unknown hyper-parameters \\['betas'\\]"):
        shardoptim.MuonAdamW(shardoptim.muon_param_groups(model), muon={"betas": (0.9, 0.9)})
    with pytest.raises(ValueError, match="state_dtype"):
        shardoptim.MuonAdamW(shardoptim.muon_param_groups(model), state_dtype=torch.float32)
    opt = shardoptim.MuonAdamW(shardoptim.muon_param_groups(model))
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "param_names": ["extra"], "use_muon": True})
    assert len(opt.param_groups) == 2, "a refused group is not added"
