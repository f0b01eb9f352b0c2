"""Run by torchrun in test_launch.py: a sharded optimizer outlives destroy_process_group(), and the
process group still goes at once (held until interpreter exit, gloo's threads abort the process)."""

from __future__ import annotations

import gc
import weakref

import torch
import torch.distributed as dist

import shardoptim


def main() -> None:
    dist.init_process_group("gloo")
    model = torch.nn.Linear(8, 4)
    opt = shardoptim.AdamW(model.parameters(), process_group=dist.group.WORLD)
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    group = weakref.ref(dist.group.WORLD)
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    assert group() is None, "the optimizer kept the process group alive past destroy_process_group()"
    assert opt.shard_state_dict()["buckets"], "what needs no collective still works"
    try:
        opt.state_dict()  # collective: refused clearly
    except RuntimeError as error:
        assert "destroy_process_group" in str(error)
    else:
        raise AssertionError("a collective after destroy_process_group() must raise")
    print("clean", flush=True)


if __name__ == "__main__":
    main()
