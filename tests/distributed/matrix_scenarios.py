"""What the matrix-algorithm tests run on every rank of a ``World``: Muon and Adafactor sharded by
whole tensors, next to the same algorithm in one process fed every rank's gradients averaged."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import shardoptim
from shardoptim import checkpoint

STEPS = 5
#: Matrices of many costs (so the owners differ by rank and bucket), and for Adafactor a vector and
#: a batch of matrices too.
MATRICES = ((24, 16), (16, 40), (8, 8), (40, 24), (5, 33), (16, 16), (3, 7))
OTHERS = ((16,), (2, 5, 6))


class Matrices(nn.Module):
    def __init__(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(shape) / shape[-1] ** 0.5) for shape in shapes)


def shapes_for(name: str) -> tuple[tuple[int, ...], ...]:
    return MATRICES if name == "Muon" else MATRICES + OTHERS


def model_for(name: str, seed: int = 0) -> Matrices:
    torch.manual_seed(seed)
    return Matrices(shapes_for(name))


def grads(model: nn.Module, step: int, rank: int, *, skipped: int | None = None) -> list[torch.Tensor | None]:
    """Rank ``rank``'s gradients at ``step``: seeded noise plus a pull of the weights to zero;
    parameter ``skipped`` gets none on odd steps (on every rank: it keeps its state and weights)."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    out = []
    for index, p in enumerate(model.parameters()):
        g = torch.randn(p.shape, generator=gen) + 0.3 * p.detach()
        out.append(None if index == skipped and step % 2 == 1 else g)
    return out


def train(opt: torch.optim.Optimizer, model: nn.Module, steps: range, *, sharded: bool, skipped: int | None) -> None:
    world = dist.get_world_size()
    for step in steps:
        if sharded:
            mine = grads(model, step, dist.get_rank(), skipped=skipped)
        else:
            every = [grads(model, step, rank, skipped=skipped) for rank in range(world)]
            mine = [None if parts[0] is None else sum(parts) / world for parts in zip(*every)]
        for p, g in zip(model.parameters(), mine):
            p.grad = g
        opt.step()
        opt.zero_grad()


def sharded_equals_single_process(name: str, sharding: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict:
    """After every step, the parameters, and at the end the gathered state dict, against the
    single-process optimizer fed the averaged gradients: bit for bit at 2 ranks; at more, within
    float tolerance (the ranks' gradients are then summed in another order than the reference sums
    them); also what the memory report says of the balance."""
    exact = dist.get_world_size() == 2
    model, reference = model_for(name), model_for(name)
    config = shardoptim.ShardingConfig(**(sharding or {}))
    opt = getattr(shardoptim, name)(model.parameters(), **kwargs, process_group=dist.group.WORLD, sharding=config)
    single = getattr(shardoptim, name)(reference.parameters(), **kwargs)
    for step in range(STEPS):
        train(opt, model, range(step, step + 1), sharded=True, skipped=2)
        train(single, reference, range(step, step + 1), sharded=False, skipped=2)
        for index, (a, b) in enumerate(zip(model.parameters(), reference.parameters())):
            what = f"{name} step {step}: parameter {index} differs by {(a - b).abs().max()}"
            assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-6, rtol=1e-5), what
    assert_same_state(opt.state_dict(), single.state_dict(), f"{name} state_dict", exact=exact)
    report = opt.memory_report()
    owned = sum(1 for bucket in opt.buckets for position in range(len(bucket.params))
                if bucket.segment_of(position) is not None)
    return {"owned": owned, "cost_share": report.largest_cost_share, "state_keys": len(opt.state)}


def assert_same_state(ours: dict, theirs: dict, what: str, *, exact: bool = True) -> None:
    assert ours["param_groups"] == theirs["param_groups"], what
    assert ours["state"].keys() == theirs["state"].keys(), f"{what}: {sorted(ours['state'])} != {sorted(theirs['state'])}"
    for index, entry in theirs["state"].items():
        assert ours["state"][index].keys() == entry.keys(), (what, index)
        for key, value in entry.items():
            mine = ours["state"][index][key]
            assert mine.dtype == value.dtype and mine.shape == value.shape, (what, index, key)
            same = torch.equal(mine, value) if exact else torch.allclose(mine, value, atol=1e-6, rtol=1e-5)
            assert same, (what, index, key, (mine - value).abs().max().item())


def state_dicts_round_trip(name: str) -> bool:
    """A sharded optimizer's full state dict loads into torch.optim and back into a sharded one (each
    rank keeping what it owns), and its shard state into a copy: every path continues bit for bit."""
    kwargs = {"lr": 0.02}
    model = model_for(name)
    opt = getattr(shardoptim, name)(model.parameters(), **kwargs, process_group=dist.group.WORLD)
    train(opt, model, range(3), sharded=True, skipped=None)
    full = opt.state_dict()

    theirs_model = copy.deepcopy(model)
    theirs = getattr(torch.optim, name)(theirs_model.parameters(), **kwargs)
    theirs.load_state_dict(full)
    again_model = copy.deepcopy(model)
    again = getattr(shardoptim, name)(again_model.parameters(), **kwargs, process_group=dist.group.WORLD)
    again.load_state_dict(copy.deepcopy(theirs.state_dict()))  # (loaded tensors are used as given, as in torch)
    copied = copy.deepcopy(opt)  # through shard_state_dict: no collective
    copied_params = [p for group in copied.param_groups for p in group["params"]]

    train(opt, model, range(3, 5), sharded=True, skipped=None)
    train(again, again_model, range(3, 5), sharded=True, skipped=None)
    train(theirs, theirs_model, range(3, 5), sharded=False, skipped=None)
    train(copied, _holding(copied_params), range(3, 5), sharded=True, skipped=None)
    for a, b, c, d in zip(model.parameters(), again_model.parameters(), theirs_model.parameters(), copied_params):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert_same_state(again.state_dict(), opt.state_dict(), "loaded back")
    assert_same_state(copied.state_dict(), opt.state_dict(), "deep copy")
    return True


def _holding(params: list[torch.Tensor]) -> nn.Module:
    module = nn.Module()
    module.weights = nn.ParameterList(params)
    return module


def save_sharded(name: str, url: str) -> dict:
    model = model_for(name)
    opt = getattr(shardoptim, name)(model.parameters(), lr=0.02, process_group=dist.group.WORLD)
    train(opt, model, range(3), sharded=True, skipped=1)
    checkpoint.save(url, model=model, optimizer=opt, extra={"step": 3})
    return {"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict()}


def load_sharded(name: str, url: str) -> dict:
    model = model_for(name, seed=7)
    opt = getattr(shardoptim, name)(model.parameters(), lr=0.02, process_group=dist.group.WORLD)
    assert checkpoint.load(url, model=model, optimizer=opt) == {"step": 3}
    return {"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict()}
