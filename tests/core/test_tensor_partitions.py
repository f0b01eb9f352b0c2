"""Whole-tensor partitions (``plan_tensor_buckets``): each parameter owned by one rank, ranks balanced
on the update cost; a pure, serialisable layout that ``plan_copies`` remaps like any other."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardoptim.algorithms import adafactor, muon
from shardoptim.core.layout import BucketLayout, ParamSpec, assign_owners, plan_buckets, plan_tensor_buckets
from shardoptim.core.reshard import plan_copies

CPU = torch.device("cpu")


def _specs(shapes, group=0):
    return [ParamSpec(i, group, tuple(shape), torch.float32, CPU) for i, shape in enumerate(shapes)]


def gpt2_small_muon_shapes():
    """The hidden matrices of GPT-2 small (HF's Conv1D orientation): per block, attention's qkv and
    output projections and the MLP's two."""
    return [shape for _ in range(12) for shape in ((768, 2304), (768, 768), (768, 3072), (3072, 768))]


def _shares(owners, shapes, cost, world):
    loads = [0.0] * world
    for index, rank in owners.items():
        loads[rank] += cost(shapes[index])
    return max(loads) / (sum(loads) / world)


@pytest.mark.parametrize("world", range(2, 17))
def test_gpt2_small_muon_matrices_are_balanced_within_ten_percent_up_to_sixteen_ranks(world):
    shapes = gpt2_small_muon_shapes()
    share = _shares(assign_owners(_specs(shapes), world, muon.cost), shapes, muon.cost, world)
    assert share <= 1.1, f"{world} ranks: the largest rank has {share:.3f}x the even share"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=25), st.integers(1, 6),
       st.sampled_from([None, 300, 2000]))
def test_every_parameter_is_owned_whole_by_one_rank(shapes, world, cap):
    specs = _specs(shapes)
    layouts = plan_tensor_buckets(specs, world_size=world, cost=muon.cost, bucket_cap_numel=cap)
    owners = assign_owners(specs, world, muon.cost)
    seen = {}
    for layout in layouts:
        assert BucketLayout.from_dict(layout.to_dict()) == layout
        for rank in range(world):
            for segment in layout.segments(rank):
                slot = layout.slots[segment.slot]
                assert segment.param_start == 0 and segment.numel == slot.numel, "a parameter was cut"
                assert slot.index not in seen
                seen[slot.index] = rank
                assert owners[slot.index] == rank
    assert sorted(seen) == list(range(len(shapes)))
    # the same parameters, bucket for bucket, as the flat plan (only their order inside and the ranges differ)
    flat = plan_buckets(specs, bucket_cap_numel=cap)
    assert [sorted(s.index for s in a.slots) for a in layouts] == [sorted(s.index for s in b.slots) for b in flat]


def test_one_rank_plans_what_plan_buckets_plans():
    specs = _specs([(7, 5), (5,), (3, 4, 2), (33, 2)])
    assert plan_tensor_buckets(specs, cost=adafactor.TENSOR_RULE.cost) == plan_buckets(specs)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=15), st.integers(1, 4),
       st.integers(1, 4))
def test_remapping_between_world_sizes_moves_every_element_once(shapes, old, new):
    specs = _specs(shapes)
    before = plan_tensor_buckets(specs, world_size=old, cost=muon.cost)
    after = plan_tensor_buckets(specs, world_size=new, cost=muon.cost)
    copied = sum(copy.numel for rank in range(new) for copy in plan_copies(before, after, rank))
    assert copied == sum(math.prod(shape) for shape in shapes)


def test_the_planner_is_deterministic_and_does_not_depend_on_dict_order():
    shapes = gpt2_small_muon_shapes()[:20]
    first = plan_tensor_buckets(_specs(shapes), world_size=5, cost=muon.cost)
    assert first == plan_tensor_buckets(list(reversed(_specs(shapes)))[::-1], world_size=5, cost=muon.cost)
