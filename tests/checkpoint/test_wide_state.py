"""Checkpoints of a bfloat16 model whose optimizer keeps float32 state and a master copy
(``state_dtype``): every path out of a checkpoint keeps the float32 tensors float32 — ``load``,
the offline ``reshard`` and the torch-format export (``optimizer_state``, what ``consolidate`` and
loading into torch.optim read)."""

from __future__ import annotations

import torch
from torch import nn

import shardoptim
from shardoptim import checkpoint
from shardoptim.checkpoint.consolidate import optimizer_state
from shardoptim.checkpoint.world_size import reshard


def _job(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(torch.bfloat16)
    return model, shardoptim.AdamW(model.parameters(), lr=1e-3, state_dtype=torch.float32)


def _trained():
    model, opt = _job()
    for _ in range(3):
        model(torch.randn(5, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _assert_state_equal(mine: dict, theirs: dict) -> None:
    assert mine.keys() == theirs.keys()
    for index, state in theirs.items():
        for name, value in state.items():
            got = mine[index][name]
            assert got.dtype == value.dtype and torch.equal(got, value), (index, name, got.dtype, value.dtype)


def test_resharded_offline_and_exported_the_float32_state_stays_float32(tmp_path):
    model, opt = _trained()
    saved = opt.state_dict()
    assert saved["state"][0]["master_param"].dtype == torch.float32
    checkpoint.save(str(tmp_path / "one"), model=model, optimizer=opt)

    reshard(str(tmp_path / "one"), str(tmp_path / "two"), world_size=2)
    for url in ("one", "two"):
        fresh, reloaded = _job(seed=1)
        checkpoint.load(str(tmp_path / url), model=fresh, optimizer=reloaded)
        _assert_state_equal(reloaded.state_dict()["state"], saved["state"])
        exported = optimizer_state(checkpoint.open_checkpoint(str(tmp_path / url)))
        _assert_state_equal(exported["state"], saved["state"])
