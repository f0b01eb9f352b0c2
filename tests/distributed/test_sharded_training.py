"""Sharded training (process_group=...) against single-process torch.optim, on real gloo groups."""

from __future__ import annotations

import pytest

from . import scenarios
from .scenarios import shardable_algorithms


@pytest.mark.parametrize("name", shardable_algorithms())
def test_two_ranks_match_single_process(worlds, name):
    worst = worlds.get(2).run(scenarios.training_parity, name)
    assert worst[0] == worst[1], "ranks disagree on the parameters"


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_four_ranks_match_single_process(worlds, name):
    worlds.get(4).run(scenarios.training_parity, name)


@pytest.mark.parametrize("pattern", ["gloo", "default"])
@pytest.mark.parametrize("bucket_cap_numel", [None, 40], ids=["one-bucket-per-dtype", "many-buckets"])
def test_collective_patterns_and_pipelined_buckets(worlds, pattern, bucket_cap_numel):
    """Both collective patterns (gloo's and the reduce-scatter/all-gather one NCCL uses), with many buckets."""
    worlds.get(2).run(scenarios.training_parity, "AdamW", pattern, bucket_cap_numel)


@pytest.mark.parametrize("implementation", [{"foreach": False}, {"foreach": True}, {"fused": True}],
                         ids=["for-loop", "foreach", "fused"])
def test_every_implementation_shards(worlds, implementation):
    worlds.get(2).run(scenarios.training_parity, "Adam", None, None, implementation)


def test_compiled_update_sharded(worlds):
    compiled = [name for name in shardable_algorithms() if scenarios.is_compiled(name)]
    if not compiled:
        pytest.skip("no algorithm uses a compiled update")
    worlds.get(2).run(scenarios.training_parity, compiled[0], None, None, {"fused": True})


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


@pytest.mark.parametrize("dense_fallback", [False, True], ids=["gloo-sparse-all-reduce", "dense-fallback"])
def test_replicated_sparse_adam(worlds, dense_fallback):
    worlds.get(2).run(scenarios.sparse_adam_parity, dense_fallback)


def test_gather_params_after_changing_shards(worlds):
    worlds.get(2).run(scenarios.gather_params_refreshes_every_rank)
