"""The averaging-function factories against torch.optim.swa_utils's."""

from __future__ import annotations

import re

import pytest
import torch
import torch.optim.swa_utils as theirs

import shardoptim.ema as ours

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.int64]


def _tensors(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (7,), ()]
    if dtype.is_floating_point or dtype.is_complex:
        return [torch.randn(shape, generator=gen, dtype=dtype) for shape in shapes]
    return [torch.randint(-50, 50, shape, generator=gen, dtype=dtype) for shape in shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [3, torch.tensor(3)], ids=["int", "tensor"])
@pytest.mark.parametrize("name,args", [("get_ema_multi_avg_fn", (0.9,)), ("get_swa_multi_avg_fn", ())])
def test_multi_avg_fn_matches_torch(name, args, dtype, count):
    averaged_ours, averaged_theirs, current = _tensors(dtype, 0), _tensors(dtype, 0), _tensors(dtype, 1)
    ours_fn, theirs_fn = getattr(ours, name)(*args), getattr(theirs, name)(*args)
    try:
        theirs_fn(averaged_theirs, current, count)
    except RuntimeError as error:  # torch's integer SWA with a tensor count: addcdiv refuses integers
        with pytest.raises(RuntimeError, match=re.escape(str(error)[:30])):
            ours_fn(averaged_ours, current, count)
        return
    ours_fn(averaged_ours, current, count)
    for a, b in zip(averaged_ours, averaged_theirs):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,args", [("get_ema_avg_fn", (0.75,)), ("get_swa_avg_fn", ())])
def test_avg_fn_matches_torch(name, args, dtype):
    averaged, current = _tensors(dtype, 0), _tensors(dtype, 1)
    ours_fn, theirs_fn = getattr(ours, name)(*args), getattr(theirs, name)(*args)
    for count in (0, 4, torch.tensor(4)):
        for a, c in zip(averaged, current):
            assert torch.equal(ours_fn(a, c, count), theirs_fn(a, c, count))


@pytest.mark.parametrize("name", ["get_ema_avg_fn", "get_ema_multi_avg_fn"])
@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_invalid_decay_raises_like_torch(name, decay):
    with pytest.raises(ValueError, match="Invalid decay value"):
        getattr(theirs, name)(decay)
    with pytest.raises(ValueError, match=f"Invalid decay value {decay}"):
        getattr(ours, name)(decay)


@pytest.mark.parametrize("name", ["get_ema_avg_fn", "get_ema_multi_avg_fn"])
@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_decay_bounds_are_valid(name, decay):
    getattr(ours, name)(decay)


def test_results_do_not_track_gradients():
    a, c = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    assert not ours.get_ema_avg_fn()(a, c, 1).requires_grad
    assert not ours.get_swa_avg_fn()(a, c, 1).requires_grad
