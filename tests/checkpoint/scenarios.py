"""What the checkpoint tests run on every rank of a ``World``: save at one world size, load at another."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import shardoptim
from shardoptim import checkpoint

STEPS = 4


class Net(nn.Module):
    """Two dtypes, a frozen layer, a buffer, a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Sequential(nn.Linear(6, 13), nn.LayerNorm(13), nn.Linear(13, 6))
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = self.body(self.embed(tokens)) + self.frozen(self.embed(tokens))
        return (x * self.scale.to(x.dtype)) @ self.embed.weight.t()


def build(name: str, world: bool, sharding: dict[str, Any] | None = None) -> tuple[Net, Any, Any, Any]:
    torch.manual_seed(0)
    model = Net()
    kwargs = {"lr": 0.02} if name != "SGD" else {"lr": 0.05, "momentum": 0.9}
    groups = [{"params": [p for n, p in model.named_parameters() if p.dim() > 1]},
              {"params": [p for n, p in model.named_parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    extra = {"process_group": dist.group.WORLD} if world else {}
    if world and sharding:
        extra["sharding"] = shardoptim.ShardingConfig(**sharding)
    opt = getattr(shardoptim, name)(groups, **kwargs, **extra)
    sched = shardoptim.sched.OneCycleLR(opt, max_lr=0.05, total_steps=50)
    ema = shardoptim.ema.ShardedEMA(opt, decay=0.9)
    return model, opt, sched, ema


def train(model: Net, opt: Any, sched: Any, ema: Any, steps: range) -> None:
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    for step in steps:
        tokens = torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(step))
        rows = tokens.shape[0] // world if opt.comm.world_size > 1 else tokens.shape[0]
        mine = tokens[rank * rows : (rank + 1) * rows] if opt.comm.world_size > 1 else tokens
        model(mine).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update()


def full_state(model: Net, opt: Any, sched: Any, ema: Any) -> dict[str, Any]:
    """Everything comparable across world sizes: the model, the gathered optimizer state, the
    schedule, the EMA as whole flat buckets (gathered by a swap)."""
    state = opt.state_dict()
    with ema.averaged():
        averaged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
        "lr": [g["lr"] for g in opt.param_groups],
        "sched": sched.state_dict(),
        "ema": averaged,
        "ema_updates": ema.num_updates,
    }


def save_after_training(name: str, url: str, sharding: dict[str, Any] | None = None) -> dict[str, Any]:
    model, opt, sched, ema = build(name, True, sharding)
    train(model, opt, sched, ema, range(STEPS))
    checkpoint.save(url, model=model, optimizer=opt, schedulers=[sched], ema=ema, extra={"step": STEPS})
    return full_state(model, opt, sched, ema)


def load_and_report(name: str, url: str, sharding: dict[str, Any] | None = None) -> dict[str, Any]:
    model, opt, sched, ema = build(name, True, sharding)
    extra = checkpoint.load(url, model=model, optimizer=opt, schedulers=[sched], ema=ema)
    assert extra == {"step": STEPS}
    return full_state(model, opt, sched, ema)
