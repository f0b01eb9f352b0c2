"""The world-size mapping of flat shards, by property-based tests over random parameter tables."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardoptim.core import ParamSpec, plan_buckets, plan_copies
from shardoptim.core.layout import BucketLayout

SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
DTYPES = st.sampled_from([torch.float32, torch.float64])


@st.composite
def parameter_tables(draw) -> list[ParamSpec]:
    count = draw(st.integers(1, 12))
    specs = []
    for index in range(count):
        group = draw(st.integers(0, 1))
        specs.append(ParamSpec(index, group, draw(SHAPES), draw(DTYPES), torch.device("cpu"), draw(st.booleans())))
    # Groups are planned one after the other, as add_param_group does.
    return sorted(specs, key=lambda spec: (spec.group, spec.index))


def layouts(specs: list[ParamSpec], world_size: int, cap: int | None) -> tuple[BucketLayout, ...]:
    planned = []
    for group in sorted({spec.group for spec in specs}):
        members = [spec for spec in specs if spec.group == group]
        planned += plan_buckets(members, world_size=world_size, bucket_cap_numel=cap, backward_order=world_size > 1)
    return tuple(planned)


def element_ids(layouts_: tuple[BucketLayout, ...], rank: int) -> list[torch.Tensor]:
    """Each shard of ``rank`` holding, per element, a code of (parameter, element), -1 for padding."""
    shards = []
    for layout in layouts_:
        lo, hi = layout.shard_range(rank)
        shard = torch.full((hi - lo,), -1, dtype=torch.int64)
        for segment in layout.segments(rank):
            slot = layout.slots[segment.slot]
            shard[segment.start : segment.stop] = slot.index * 10_000 + torch.arange(
                segment.param_start, segment.param_start + segment.numel
            )
        shards.append(shard)
    return shards


@settings(max_examples=150, deadline=None)
@given(
    specs=parameter_tables(),
    source_world=st.integers(1, 4),
    target_world=st.integers(1, 4),
    source_cap=st.one_of(st.none(), st.integers(1, 80)),
    target_cap=st.one_of(st.none(), st.integers(1, 80)),
)
def test_copies_fill_every_owned_element_from_its_source_exactly_once(
    specs, source_world, target_world, source_cap, target_cap
):
    source, target = layouts(specs, source_world, source_cap), layouts(specs, target_world, target_cap)
    saved = [element_ids(source, rank) for rank in range(source_world)]
    covered = 0
    for rank in range(target_world):
        expected = element_ids(target, rank)
        filled = [torch.full_like(shard, -1) for shard in expected]
        written = [torch.zeros_like(shard) for shard in expected]
        for copy in plan_copies(source, target, rank):
            assert copy.numel > 0
            part = saved[copy.source_rank][copy.source_bucket][copy.source_start : copy.source_start + copy.numel]
            assert (part >= 0).all(), "a copy reads padding"
            filled[copy.target_bucket][copy.target_start : copy.target_start + copy.numel] = part
            written[copy.target_bucket][copy.target_start : copy.target_start + copy.numel] += 1
            covered += copy.numel
        for want, got, count in zip(expected, filled, written):
            assert torch.equal(got, want), "a target element got another element's value"
            assert torch.equal(count, (want >= 0).long()), "an element written twice, or padding written"
    assert covered == sum(math.prod(spec.shape) for spec in specs)


@settings(max_examples=50, deadline=None)
@given(specs=parameter_tables(), world=st.integers(1, 4), cap=st.one_of(st.none(), st.integers(1, 80)))
def test_same_layout_maps_each_rank_onto_its_own_shards(specs, world, cap):
    planned = layouts(specs, world, cap)
    for rank in range(world):
        for copy in plan_copies(planned, planned, rank):
            assert copy.source_rank == rank and copy.source_bucket == copy.target_bucket
            assert copy.source_start == copy.target_start


@settings(max_examples=50, deadline=None)
@given(specs=parameter_tables(), world=st.integers(1, 4), cap=st.one_of(st.none(), st.integers(1, 80)))
def test_layouts_round_trip_through_plain_data(specs, world, cap):
    planned = layouts(specs, world, cap)
    assert tuple(BucketLayout.from_dict(layout.to_dict()) for layout in planned) == planned
