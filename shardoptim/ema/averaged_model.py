"""``AveragedModel``: a copy of a module whose weights are a running average of another module's."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .averaging import AvgFn, MultiAvgFn, get_swa_avg_fn, get_swa_multi_avg_fn


def _foreach_device_types() -> tuple[str, ...]:
    # Where torch has multi-tensor kernels; there, the default SWA runs as one lerp per tensor list,
    # elsewhere as the per-tensor formula. The two round differently, and torch picks by this list.
    return ("cuda", "xpu", "mtia", torch._C._get_privateuse1_backend_name())


class AveragedModel(nn.Module):
    """Keeps ``module``, a deep copy of a model, whose weights average the model's over time.

    Each ``update_parameters(model)`` folds the model's current weights into the average: the first
    call copies them; later calls apply the averaging rule. Without a rule that is the equal-weight
    mean of all the weights seen (Stochastic Weight Averaging, Izmailov et al., 2018); with
    ``multi_avg_fn=get_ema_multi_avg_fn(decay)`` it is an exponential moving average.
    ``forward`` runs the averaged copy. A drop-in for ``torch.optim.swa_utils.AveragedModel``: same
    arguments, numbers and ``state_dict`` (``module.*`` plus ``n_averaged``), so either class loads
    the other's.

    Args:
        model: the module to average; it is copied, never modified.
        device: where the averaged copy lives (default: wherever ``model`` is).
        avg_fn: ``avg_fn(averaged, current, num_averaged) -> Tensor``, applied to one tensor at a time.
        multi_avg_fn: ``multi_avg_fn(averaged_list, current_list, num_averaged)``, updating a list of
            tensors of one device and dtype in place. At most one of ``avg_fn`` and ``multi_avg_fn``.
        use_buffers: average the buffers too (BatchNorm statistics, ...). When ``False`` the buffers
            are copied from the model at every update instead.

    Attributes:
        n_averaged: a 0-D ``long`` buffer, how many updates the average holds.

    Neither averaging function is part of ``state_dict()``.
    """

    n_averaged: Tensor

    def __init__(
        self,
        model: nn.Module,
        device: int | str | torch.device | None = None,
        avg_fn: AvgFn | None = None,
        multi_avg_fn: MultiAvgFn | None = None,
        use_buffers: bool = False,
    ) -> None:
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            # torch's exception type for this misuse.
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        self.module = copy.deepcopy(model)
        if device is not None:
            self.module = self.module.to(device)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged module."""
        return self.module(*args, **kwargs)

    def _averaged_tensors(self, module: nn.Module) -> Iterator[Tensor]:
        if self.use_buffers:
            return itertools.chain(module.parameters(), module.buffers())
        return module.parameters()

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Fold ``model``'s current parameters (and buffers, with ``use_buffers``) into the average.

        Tensors are paired with the averaged copy's in ``parameters()`` (then ``buffers()``) order.
        """
        pairs = [
            (averaged.detach(), current.detach().to(averaged.device))
            for averaged, current in zip(self._averaged_tensors(self.module), self._averaged_tensors(model))
        ]
        count = int(self.n_averaged)
        if count == 0:
            for averaged, current in pairs:
                averaged.copy_(current)
        elif count > 0:
            self._average(pairs)
        if not self.use_buffers:
            for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
                mine.detach().copy_(theirs.detach().to(mine.device))
        self.n_averaged += 1

    def _average(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        if self.avg_fn is not None:
            for averaged, current in pairs:
                averaged.copy_(self.avg_fn(averaged, current, self.n_averaged.to(averaged.device)))
            return
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for averaged, current in pairs:
            averaged_list, current_list = groups.setdefault((averaged.device, averaged.dtype), ([], []))
            averaged_list.append(averaged)
            current_list.append(current)
        for (device, _), (averaged_list, current_list) in groups.items():
            count = self.n_averaged.to(device)
            if self.multi_avg_fn is not None:
                self.multi_avg_fn(averaged_list, current_list, count)
            elif device.type in _foreach_device_types():
                get_swa_multi_avg_fn()(averaged_list, current_list, count)
            else:
                swa = get_swa_avg_fn()
                for averaged, current in zip(averaged_list, current_list):
                    averaged.copy_(swa(averaged, current, count))
