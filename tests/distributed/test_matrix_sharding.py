"""Muon and Adafactor sharded by whole tensors (each parameter owned by one rank) at 2 and 4 ranks:
bit for bit the single-process optimizer, under the collectives and gradient modes of ShardingConfig;
state dicts, shard state and checkpoints across world sizes."""

from __future__ import annotations

import pytest
import torch

import shardoptim
from shardoptim import checkpoint
from shardoptim.checkpoint.consistency import check_consistency
from shardoptim.checkpoint.consolidate import optimizer_state
from shardoptim.checkpoint.world_size import reshard

from . import matrix_scenarios

CONFIGS = {
    "default": None,
    "zero2-overlap": {"shard_grads": True, "overlap_grad_reduce": True, "bucket_cap_numel": 900},
    "reduce_scatter-all_gather": {"average": "reduce_scatter", "gather": "all_gather", "bucket_cap_numel": 900},
    "all_reduce-broadcast": {"average": "all_reduce", "gather": "broadcast"},
}
OPTIONS = {
    "Muon": [{"lr": 0.02}, {"lr": 0.02, "nesterov": False, "adjust_lr_fn": "match_rms_adamw", "ns_steps": 3}],
    "Adafactor": [{"lr": 0.02}, {"lr": 0.02, "weight_decay": 0.1, "maximize": True, "beta2_decay": -0.5}],
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_two_ranks_match_one_process_bit_for_bit(worlds, name, config):
    for kwargs in OPTIONS[name]:
        results = worlds.get(2).run(matrix_scenarios.sharded_equals_single_process, name, CONFIGS[config], kwargs)
        shapes = matrix_scenarios.shapes_for(name)
        assert sum(r["owned"] for r in results) == len(shapes), "every parameter has exactly one owner"
        assert all(r["owned"] > 0 for r in results), "both ranks own some"


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_four_ranks_match_one_process_bit_for_bit(worlds, name):
    results = worlds.get(4).run(matrix_scenarios.sharded_equals_single_process, name, CONFIGS["zero2-overlap"],
                                OPTIONS[name][0])
    assert sum(r["owned"] for r in results) == len(matrix_scenarios.shapes_for(name))


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_state_dicts_and_shard_state_round_trip(worlds, name):
    assert worlds.get(2).run(matrix_scenarios.state_dicts_round_trip, name) == [True, True]


def _assert_same(loaded: dict, saved: dict) -> None:
    for a, b in zip(loaded["params"], saved["params"]):
        assert torch.equal(a, b)
    matrix_scenarios.assert_same_state(loaded["state"], saved["state"], "after loading")


@pytest.mark.parametrize("name", ["Muon", "Adafactor"])
def test_a_two_rank_checkpoint_loads_at_three_and_one_and_reshards_offline(worlds, tmp_path, name):
    url = str(tmp_path / "two")
    saved = worlds.get(2).run(matrix_scenarios.save_sharded, name, url)[0]
    manifest = checkpoint.open_checkpoint(url).manifest
    first_tensor = "momentum_buffer" if name == "Muon" else "step"
    ranks = {entry[first_tensor]["rank"] for entry in manifest.optimizer["per_parameter"].values()}
    assert ranks == {0, 1}, "each rank saved the state of the parameters it owns, in its own file"
    for loaded in worlds.get(3).run(matrix_scenarios.load_sharded, name, url):
        _assert_same(loaded, saved)
    model = matrix_scenarios.model_for(name, seed=7)
    single = getattr(shardoptim, name)(model.parameters(), lr=0.02)
    checkpoint.load(url, model=model, optimizer=single)
    _assert_same({"params": list(model.parameters()), "state": single.state_dict()}, saved)

    check_consistency(checkpoint.open_checkpoint(url))  # what the shardoptim command checks first
    exported = optimizer_state(checkpoint.open_checkpoint(url))
    matrix_scenarios.assert_same_state(exported, saved["state"], "the torch-format export")

    reshard(url, str(tmp_path / "three"), world_size=3)
    checkpoint.open_checkpoint(str(tmp_path / "three")).verify()
    for loaded in worlds.get(3).run(matrix_scenarios.load_sharded, name, str(tmp_path / "three")):
        _assert_same(loaded, saved)


@pytest.mark.parametrize("config", ["default", "zero2-overlap"])
@pytest.mark.parametrize("size", [2, 4])
def test_muon_adamw_sharded_matches_one_process(worlds, size, config):
    worst = worlds.get(size).run(matrix_scenarios.muon_adamw_sharded_equals_single_process, CONFIGS[config])
    assert len(set(worst)) == 1, "ranks disagree on the parameters"


def test_a_muon_adamw_checkpoint_of_two_ranks_loads_at_three_and_one(worlds, tmp_path):
    url = str(tmp_path / "two")
    saved = worlds.get(2).run(matrix_scenarios.save_muon_adamw, url)[0]
    check_consistency(checkpoint.open_checkpoint(url))
    for loaded in [*worlds.get(3).run(matrix_scenarios.load_muon_adamw, url),
                   *worlds.get(1).run(matrix_scenarios.load_muon_adamw, url)]:
        _assert_same(loaded, saved)
        assert all(torch.equal(a, b) for a, b in zip(loaded["ema"], saved["ema"]))
        assert loaded["lr"] == saved["lr"]
    reshard(url, str(tmp_path / "three"), world_size=3)
    for loaded in worlds.get(3).run(matrix_scenarios.load_muon_adamw, str(tmp_path / "three")):
        _assert_same(loaded, saved)
