"""Sharded training (process_group=...) against single-process torch.optim, on real gloo groups."""

from __future__ import annotations

import itertools

import torch

import pytest

from . import scenarios
from .scenarios import shardable_algorithms

#: Every collective choice and gradient mode a sharded step has, configured as users do: ShardingConfig.
GRID = [
    {"average": average, "gather": gather, "shard_grads": shard_grads, "overlap_grad_reduce": overlap,
     "bucket_cap_numel": 40}
    for average, gather, shard_grads, overlap in itertools.product(
        ("reduce_scatter", "all_to_all", "all_reduce"), ("all_gather", "broadcast"), (False, True), (False, True)
    )
]
ZERO2_OVERLAP = {"shard_grads": True, "overlap_grad_reduce": True, "bucket_cap_numel": 40}


def _grid_id(config):
    flags = [config["average"], config["gather"]]
    flags += ["zero2"] if config["shard_grads"] else []
    flags += ["overlap"] if config["overlap_grad_reduce"] else []
    return "-".join(flags)


@pytest.mark.parametrize("sharding", GRID, ids=_grid_id)
@pytest.mark.parametrize("name", ["Adam", "NAdam"])
def test_every_collective_and_gradient_mode(worlds, name, sharding):
    """Adam (torch's kernel) and NAdam (compiled) at 2 ranks under every ``ShardingConfig`` combination."""
    worst = worlds.get(2).run(scenarios.training_parity, name, sharding, {"fused": True} if name == "NAdam" else None)
    assert worst[0] == worst[1], "ranks disagree on the parameters"


@pytest.mark.parametrize("sharding", [None, ZERO2_OVERLAP], ids=["default", "zero2-overlap"])
@pytest.mark.parametrize("name", shardable_algorithms())
@pytest.mark.parametrize("size", [2, 4])
def test_every_algorithm_matches_single_process(worlds, size, name, sharding):
    worst = worlds.get(size).run(scenarios.training_parity, name, sharding)
    assert len(set(worst)) == 1, "ranks disagree on the parameters"


@pytest.mark.parametrize("implementation", [{"foreach": False}, {"foreach": True}, {"fused": True}],
                         ids=["for-loop", "foreach", "fused"])
def test_every_implementation_shards(worlds, implementation):
    worlds.get(2).run(scenarios.training_parity, "Adam", None, implementation)


@pytest.mark.parametrize("sharding", [None, ZERO2_OVERLAP], ids=["default", "zero2-overlap"])
@pytest.mark.parametrize("ddp", [False, True], ids=["no_sync", "ddp-no_sync"])
@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_gradient_accumulation_over_micro_batches(worlds, name, ddp, sharding):
    worlds.get(2).run(scenarios.accumulation_parity, name, ddp, sharding)


@pytest.mark.parametrize("sharding", [None, ZERO2_OVERLAP], ids=["default", "zero2-overlap"])
@pytest.mark.parametrize("name", ["AdamW", "NAdam", "ASGD"])
def test_shard_state_round_trip_is_bitwise(worlds, name, sharding):
    worlds.get(2).run(scenarios.shard_state_round_trip, name, sharding)


def test_late_gradient_under_overlap_raises_everywhere(worlds):
    worlds.get(2).run(scenarios.late_gradient_under_overlap_raises)


def test_overlap_launches_complete_buckets_during_backward(worlds):
    for numbers in worlds.get(2).run(scenarios.overlap_launches_during_backward):
        assert numbers["buckets"] > 1
        assert numbers["launched_in_backward"] == numbers["buckets"]


@pytest.mark.parametrize("gradient_as_bucket_view", [False, True])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_under_ddp_without_reducing(worlds, name, gradient_as_bucket_view):
    worlds.get(2).run(scenarios.ddp_parity, name, gradient_as_bucket_view)


@pytest.mark.parametrize("name", ["Adam", "ASGD"])
def test_add_param_group_after_steps(worlds, name):
    worlds.get(2).run(scenarios.add_param_group_later, name)


@pytest.mark.parametrize("kind", ["count", "shape", "order", "add_param_group"])
def test_ranks_with_other_parameters_fail_fast(worlds, kind):
    worlds.get(2).run(scenarios.mismatched_params, kind, timeout=60)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_replicated_lbfgs(worlds, line_search_fn):
    worlds.get(2).run(scenarios.lbfgs_parity, line_search_fn)


def test_replicated_sparse_adam(worlds):
    worlds.get(2).run(scenarios.sparse_adam_parity)


def test_sparse_sum_without_sparse_all_reduce(worlds):
    worlds.get(2).run(scenarios.sparse_sum_as_dense_matches_sparse_all_reduce)


def test_gather_params_after_changing_shards(worlds):
    worlds.get(2).run(scenarios.gather_params_refreshes_every_rank)


@pytest.mark.parametrize("scaler", ["shardoptim", "torch"])
def test_grad_scaler_skips_an_inf_step_on_every_rank(worlds, scaler):
    results = worlds.get(2).run(scenarios.grad_scaler_with_an_inf_on_one_rank, scaler)
    for result in results:
        assert result["skipped"] == [False, True, False, False], "the inf step, and only it, is skipped"
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b), "the ranks stay identical"
    if scaler == "shardoptim":
        assert results[0]["scales"] == results[1]["scales"], "every rank lowers its scale alike"
        assert results[0]["scales"][1] == results[0]["scales"][0] / 2
        assert not any(result["warned"] for result in results)
    else:
        assert results[0]["warned"], "torch's scaler on the rank that saw no inf: told to use ours"


def test_grad_scaler_skips_an_inf_step_in_a_differentiable_group_too(worlds):
    results = worlds.get(2).run(scenarios.grad_scaler_with_an_inf_on_one_rank, "shardoptim", True)
    for result in results:
        assert result["skipped"] == [False, True, False, False], "the inf step, and only it, is skipped"


def test_a_dead_peer_fails_the_step_within_the_timeout(worlds):
    world = worlds.get(2)
    try:
        outcome = world.run(scenarios.a_peer_that_never_comes, 3.0)[0]
    finally:
        world.close()  # its ranks disagree on the collectives done: the next test gets a fresh world
    seconds, kind, message = outcome.split("|", 2)
    assert kind == "CollectiveError" and "step 1" in message and "within 3 s" in message, message
    assert float(seconds) < 30
