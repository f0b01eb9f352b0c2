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


class Mixed(nn.Module):
    """Hidden matrices for Muon; an embedding, biases, a norm and a vector for AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 24)
        self.blocks = nn.ModuleList(nn.Linear(24, 24) for _ in range(3))
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 30, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        x = self.norm(x + self.down(torch.relu(self.up(x))))
        return self.head(x)


def mixed_model(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    return Mixed()


def mixed_optimizer(model: nn.Module, *, sharded: bool, sharding: dict[str, Any] | None = None):
    groups = shardoptim.muon_param_groups(model, muon={"lr": 0.02}, adamw={"lr": 3e-3, "foreach": True})
    extra = {"process_group": dist.group.WORLD, "sharding": shardoptim.ShardingConfig(**(sharding or {}))} if sharded else {}
    return shardoptim.MuonAdamW(groups, **extra)


def mixed_steps(model: nn.Module, opt: Any, steps: range, *, sharded: bool) -> None:
    """Each rank its quarter of a batch of tokens; the single-process optimizer the whole batch's mean."""
    world, rank = dist.get_world_size(), dist.get_rank()
    for step in steps:
        tokens = torch.randint(0, 30, (4 * world, 5), generator=torch.Generator().manual_seed(step))
        rows = [tokens[r * 4 : (r + 1) * 4] for r in range(world)]
        if sharded:
            model(rows[rank]).pow(2).mean().backward()
        else:
            for part in rows:
                (model(part).pow(2).mean() / world).backward()
        opt.step()
        opt.zero_grad()


def muon_adamw_sharded_equals_single_process(sharding: dict[str, Any] | None) -> float:
    model, reference = mixed_model(), mixed_model()
    opt = mixed_optimizer(model, sharded=True, sharding=sharding)
    single = mixed_optimizer(reference, sharded=False)
    schedulers = [shardoptim.sched.CosineAnnealingLR(o, T_max=8) for o in (opt, single)]
    # The reference sums the ranks' gradients in another order than the collectives; Muon's
    # bfloat16 orthogonalisation turns those last-bit differences into bfloat16 ones (~4e-3 relative)
    # wherever a rounding falls differently, which at 4 ranks it does within a few steps.
    atol, rtol = (1e-6, 1e-5) if dist.get_world_size() == 2 else (2e-3, 1e-2)
    worst = 0.0
    for step in range(6):
        mixed_steps(model, opt, range(step, step + 1), sharded=True)
        mixed_steps(reference, single, range(step, step + 1), sharded=False)
        for scheduler in schedulers:
            scheduler.step()
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"step {step}, {name}: {m}")
            worst = max(worst, (a - b).abs().max().item())
    if dist.get_world_size() == 2:
        assert_same_state(opt.state_dict(), single.state_dict(), "MuonAdamW state_dict", exact=False)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in single.param_groups]
    return worst


def save_muon_adamw(url: str) -> dict:
    model = mixed_model()
    opt = mixed_optimizer(model, sharded=True, sharding={"bucket_cap_numel": 1500})
    ema = shardoptim.ema.ShardedEMA(opt, decay=0.9)
    scheduler = shardoptim.sched.CosineAnnealingLR(opt, T_max=8)
    for step in range(3):
        mixed_steps(model, opt, range(step, step + 1), sharded=True)
        ema.update()
        scheduler.step()
    checkpoint.save(url, model=model, optimizer=opt, schedulers=[scheduler], ema=ema)
    with ema.averaged():
        averaged = [p.detach().clone() for p in model.parameters()]
    return {"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict(),
            "ema": averaged, "lr": scheduler.get_last_lr()}


def load_muon_adamw(url: str) -> dict:
    model = mixed_model(seed=5)
    opt = mixed_optimizer(model, sharded=True, sharding={"bucket_cap_numel": 1500})
    ema = shardoptim.ema.ShardedEMA(opt, decay=0.9)
    scheduler = shardoptim.sched.CosineAnnealingLR(opt, T_max=8)
    checkpoint.load(url, model=model, optimizer=opt, schedulers=[scheduler], ema=ema)
    with ema.averaged():
        averaged = [p.detach().clone() for p in model.parameters()]
    return {"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict(),
            "ema": averaged, "lr": scheduler.get_last_lr()}
