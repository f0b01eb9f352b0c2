"""``GradScaler``: torch's, with its inf/NaN checks agreed across a sharded optimizer's ranks."""

from __future__ import annotations

import torch
from torch import Tensor


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` for sharded shardoptim optimizers (it works with any optimizer).

    Each rank checks its own gradients for inf/NaN; with a sharded optimizer the ranks must reach the
    same answer, or one rank skips a step whose collectives its peers run, and the ranks' scales
    drift apart. This scaler combines the ranks' answers (one all-reduce of a flag, over the
    optimizer's process group) wherever torch's checks: in ``unscale_()`` and in ``step()``. So an
    inf on one rank skips the step on every rank, and ``update()`` changes every rank's scale alike.
    Same constructor and methods as torch's; call them on every rank.
    """

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: Tensor, found_inf: Tensor, allow_fp16: bool
    ) -> dict[torch.device, Tensor]:
        per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        comm = getattr(optimizer, "comm", None)
        if comm is None or comm.world_size == 1:
            return per_device
        flag = torch.tensor([sum(float(v) for v in per_device.values())], dtype=torch.float32, device=comm.small_device)
        comm.launch_reduce(flag, "max", label="GradScaler: the inf check across ranks").wait()
        for value in per_device.values():
            value.fill_(flag.item())
        return per_device
