"""ASGD beyond the generic table: its scalar state (``eta``, ``mu``, ``step``)."""

from __future__ import annotations

import pytest
import torch

import shardoptim
from tests.algorithms.cases import run
from tests.oracle import make_params


def test_asgd_scalar_state_is_torch_shaped():
    """``eta``, ``mu`` and ``step`` are 0-D tensors of torch's dtype; ``ax`` is shaped like the parameter."""
    _, _, ours, theirs = run("ASGD", dict(lr=0.05, t0=3.0, lambd=0.02), "default", steps=6)
    for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        for key in ("step", "eta", "mu"):
            assert ours.state[p][key].shape == () and ours.state[p][key].dtype == theirs.state[q][key].dtype
            torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], rtol=0, atol=0)
        assert ours.state[p]["ax"].shape == p.shape


def test_asgd_rejects_a_malformed_scalar_state():
    opt = shardoptim.ASGD(make_params(), t0=3.0)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["eta"] = torch.ones(3)
    before = opt.state_dict()["state"][0]["eta"].clone()
    with pytest.raises(ValueError, match="eta"):
        opt.load_state_dict(saved)
    assert torch.equal(opt.state_dict()["state"][0]["eta"], before)
