"""opt.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ on the whole (unsharded) model."""

from __future__ import annotations

import math

import pytest
import torch

import shardoptim
from tests.oracle import make_params

from . import scenarios


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["clipping", "not-clipping"])
def test_sharded_clip_matches_torch(worlds, max_norm, norm_type):
    worlds.get(2).run(scenarios.clip_parity, max_norm, norm_type)


def test_sharded_clip_under_ddp(worlds):
    worlds.get(2).run(scenarios.clip_parity, 0.05, 2.0, False)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_sharded_clip_four_ranks(worlds, norm_type):
    worlds.get(4).run(scenarios.clip_parity, 0.05, norm_type)


def test_clip_then_zero_grad_does_not_leak_into_next_step(worlds):
    worlds.get(2).run(scenarios.clip_then_zero_grad_discards)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_process_clip_matches_torch(norm_type, dtype):
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = shardoptim.SGD(ours, lr=0.1)
    ref = torch.optim.SGD(theirs, lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if (step + i) % 3 == 0:  # some parameters without a gradient, some steps
                a.grad = b.grad = None
            else:
                grad = torch.randn(a.shape, generator=gen, dtype=dtype)
                a.grad, b.grad = grad.clone(), grad.clone()
        total = opt.clip_grad_norm_(0.5, norm_type)
        ref_total = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
        torch.testing.assert_close(total, ref_total.to(total.dtype))
        for a, b in zip(ours, theirs):
            if b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad)
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_single_process_clip_edge_cases():
    params = make_params()
    opt = shardoptim.Adam(params)
    assert opt.clip_grad_norm_(1.0).item() == 0.0  # no gradients: torch returns 0 as well
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="norm_type"):
        opt.clip_grad_norm_(1.0, norm_type=0)
