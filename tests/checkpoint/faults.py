"""What the fault tests run on every rank of a ``World``: a replicated optimizer under DDP, a disk that
fills up during a two-rank save."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import shardoptim
from shardoptim import checkpoint

from . import faulty_fs  # noqa: F401 - registers fulldisk://
from .scenarios import build, full_state, train


def _ddp_job() -> tuple[nn.Module, DistributedDataParallel, shardoptim.AdamW]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.2), nn.Linear(12, 3))
    return model, DistributedDataParallel(model), shardoptim.AdamW(model.parameters(), lr=0.01)


def _ddp_steps(trained: nn.Module, opt: shardoptim.AdamW, steps: int) -> None:
    for _ in range(steps):
        trained(torch.randn(4, 6)).pow(2).mean().backward()  # data and dropout from the rank's own generator
        opt.step()
        opt.zero_grad()


def replicated_save(url: str) -> dict[str, Any]:
    """DDP with a replicated shardoptim optimizer: every rank calls ``save`` (the job's group)."""
    model, trained, opt = _ddp_job()
    torch.manual_seed(100 + dist.get_rank())
    _ddp_steps(trained, opt, 3)
    checkpoint.save(url, model=model, optimizer=opt, extra={"step": 3})
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": copy.deepcopy(opt.state_dict())}
    _ddp_steps(trained, opt, 2)  # the uninterrupted run, each rank drawing from its own generator
    state["after"] = {k: v.clone() for k, v in model.state_dict().items()}
    return state


def replicated_resume(url: str) -> dict[str, Any]:
    model, trained, opt = _ddp_job()
    torch.manual_seed(999)  # other generator states: the checkpoint's must come back, each rank its own
    assert checkpoint.load(url, model=model, optimizer=opt) == {"step": 3}
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": copy.deepcopy(opt.state_dict())}
    _ddp_steps(trained, opt, 2)
    state["after"] = {k: v.clone() for k, v in model.state_dict().items()}
    return state


def save_onto_a_full_disk(root: str, options: dict[str, Any]) -> dict[str, Any]:
    """A sharded job that saves step 1, then fails to save step 2 (the test set the disk's capacity)."""
    model, opt, sched, ema = build("AdamW", True)
    components = {"model": model, "optimizer": opt, "schedulers": [sched], "ema": ema}
    manager = checkpoint.CheckpointManager(root, keep_last=1, storage_options=options)
    train(model, opt, sched, ema, range(2))
    manager.save(1, **components)
    state = full_state(model, opt, sched, ema)
    dist.barrier()
    if dist.get_rank() == 0:
        used = faulty_fs.disk_usage(options["root"])
        with open(options["capacity_file"], "w") as f:
            f.write(str(used + used // 3))  # room for a third of another checkpoint
    dist.barrier()
    train(model, opt, sched, ema, range(2, 4))
    try:
        manager.save(2, **components)
    except checkpoint.CheckpointError as error:
        return {"error": str(error), "cause": repr(error.__cause__), "state": state}
    return {"error": None, "state": state}


def lbfgs_round_trip(url: str) -> bool:
    """An optimizer that cannot shard, under a process group: every rank holds it whole; rank 0 saves it."""
    def job() -> tuple[nn.Module, shardoptim.LBFGS]:
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        return model, shardoptim.LBFGS(model.parameters(), lr=0.5, history_size=3, process_group=dist.group.WORLD)

    model, opt = job()
    data = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(data).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    checkpoint.save(url, model=model, optimizer=opt)
    saved = opt.state_dict()
    fresh, reloaded = job()
    checkpoint.load(url, model=fresh, optimizer=reloaded)
    from .test_resharding import assert_same

    assert_same(reloaded.state_dict(), saved, "LBFGS state")
    assert_same(fresh.state_dict(), model.state_dict(), "model")
    return True
