"""``update_bn``: recompute BatchNorm running statistics for averaged weights with one pass over data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: int | str | torch.device | None = None) -> None:
    """Recompute the ``running_mean`` / ``running_var`` of every BatchNorm layer of ``model``.

    Averaged weights do not match the statistics the BatchNorm layers gathered during training, so
    the statistics are reset and re-estimated as a plain (cumulative) average over one pass of
    ``loader``. Each batch is a tensor, or a list/tuple whose first element is the model's input; it
    is moved to ``device`` when given. The model is run in training mode and returned to the mode
    it was in (``model.train(was_training)``, applied to every submodule); each layer's ``momentum``
    is restored. A model without BatchNorm layers is left untouched and the loader is not read.
    """
    layers = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # None: a cumulative average over all batches of the pass
    was_training = model.training
    model.train()
    for batch in loader:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        if device is not None:
            inputs = inputs.to(device)
        model(inputs)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.train(was_training)
