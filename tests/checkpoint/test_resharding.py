"""A checkpoint written by N ranks loads on M ranks with the same full state."""

from __future__ import annotations

import math

import pytest
import torch

from . import scenarios

GRID = [(1, 2), (2, 1), (2, 3), (3, 2), (2, 4), (4, 1), (2, 2)]


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {a.keys()} != {b.keys()}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("saved, loaded", GRID, ids=[f"{n}to{m}" for n, m in GRID])
def test_a_checkpoint_of_n_ranks_loads_on_m_ranks(worlds, tmp_path, saved, loaded):
    url = str(tmp_path / "ckpt")
    before = worlds.get(saved).run(scenarios.save_after_training, "AdamW", url)[0]
    after = worlds.get(loaded).run(scenarios.load_and_report, "AdamW", url)
    for rank, state in enumerate(after):
        assert_same(state, before, f"rank {rank}")
