"""What the command-line tests run: a 2-rank training run that saves two steps, and the loads they compare."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from shardoptim import checkpoint

from . import scenarios

#: A small bucket cap: the optimizer has several buckets per group, which merge at one rank.
SHARDING = {"bucket_cap_numel": 100}
SAVED_STEP = scenarios.STEPS
CONTINUED = 3


def continue_training(model: Any, opt: Any, steps: range) -> None:
    """Steps without the scheduler and the EMA, so that a torch.optim run can follow the same path:
    each rank of a sharded optimizer takes its rows of the batch (averaged: the mean of the batch)."""
    sharded = dist.is_initialized() and getattr(getattr(opt, "comm", None), "world_size", 1) > 1
    world, rank = (dist.get_world_size(), dist.get_rank()) if sharded else (1, 0)
    for step in steps:
        tokens = torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(1000 + step))
        rows = tokens.shape[0] // world
        model(tokens[rank * rows : (rank + 1) * rows]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def train_and_save(root: str) -> dict[str, torch.Tensor]:
    """On every rank of a 2-rank world: train, save ``root/step-4``, train on, save ``root/step-7``.

    Returns the model's state after the continued steps (from which step-7 was saved)."""
    model, opt, sched, ema = scenarios.build("AdamW", True, SHARDING)
    scenarios.train(model, opt, sched, ema, range(SAVED_STEP))
    parts = {"model": model, "optimizer": opt, "schedulers": [sched], "ema": ema}
    checkpoint.save(f"{root}/step-{SAVED_STEP}", **parts, extra={"step": SAVED_STEP}, step=SAVED_STEP)
    continue_training(model, opt, range(SAVED_STEP, SAVED_STEP + CONTINUED))
    reference = {key: value.detach().clone() for key, value in model.state_dict().items()}
    end = SAVED_STEP + CONTINUED
    checkpoint.save(f"{root}/step-{end}", **parts, extra={"step": end}, step=end)
    return reference


def load_full_state(url: str) -> dict[str, Any]:
    """The full state after loading ``url`` (at this world's size; in one process without a group)."""
    if dist.is_initialized():
        return scenarios.load_and_report("AdamW", url, SHARDING)
    model, opt, sched, ema = scenarios.build("AdamW", False)
    checkpoint.load(url, model=model, optimizer=opt, schedulers=[sched], ema=ema)
    return scenarios.full_state(model, opt, sched, ema)


def live_layouts() -> list[dict[str, Any]]:
    """The bucket layouts an optimizer built at this world's size (in one process: unsharded) has."""
    if dist.is_initialized():
        _, opt, _, _ = scenarios.build("AdamW", True, SHARDING)
    else:
        _, opt, _, _ = scenarios.build("AdamW", False)
    return [bucket.layout.to_dict() for bucket in opt.buckets]
