"""Small seeded models and training steps shared by the ema tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def bn_net(seed: int = 0) -> nn.Module:
    """Convolution, BatchNorm2d, BatchNorm1d: parameters, float buffers and integer buffers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.BatchNorm1d(5),
        nn.Linear(5, 2),
    )


def mixed_dtype_net(seed: int = 0) -> nn.Module:
    """Parameters of two dtypes, so averaging runs on two (device, dtype) groups."""
    torch.manual_seed(seed)
    net = nn.ModuleDict({"f32": nn.Linear(4, 3), "f64": nn.Linear(3, 2).double()})
    return net


def input_for(model: nn.Module, batch: int, gen: torch.Generator) -> torch.Tensor:
    if isinstance(model, nn.Sequential) and isinstance(model[0], nn.Conv2d):
        return torch.randn(batch, 2, 6, 6, generator=gen)
    return torch.randn(batch, 6, generator=gen)


def train_step(model: nn.Module, gen: torch.Generator, lr: float = 0.1) -> None:
    """One SGD step on a random regression target; moves parameters and BatchNorm statistics."""
    model.train()
    if isinstance(model, nn.ModuleDict):
        out = model["f64"](model["f32"](torch.randn(5, 4, generator=gen)).double())
    else:
        out = model(input_for(model, 8, gen))
    loss = out.square().mean()
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
