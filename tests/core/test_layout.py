"""Bucket layout: a pure, serialisable function of the parameters and the world size."""

from __future__ import annotations

import pytest
import torch

from shardoptim.core import ALIGNMENT, BucketLayout, ParamSpec, plan_buckets


def _specs(shapes, group=0, dtype=torch.float32, start=0):
    return [ParamSpec(start + i, group, shape, dtype, torch.device("cpu")) for i, shape in enumerate(shapes)]


SHAPES = [(7, 5), (5,), (), (100, 3), (33,)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_slots_are_aligned_disjoint_and_shards_cover_the_padded_buffer(world_size):
    (layout,) = plan_buckets(_specs(SHAPES), world_size=world_size)
    ends = 0
    for slot in layout.slots:
        assert slot.offset % ALIGNMENT == 0 and slot.offset >= ends
        ends = slot.end
    assert layout.numel % (world_size * ALIGNMENT) == 0 and layout.numel >= ends
    ranges = [layout.shard_range(r) for r in range(world_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layout.numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # Every element of every parameter is owned by exactly one rank.
    owned = torch.zeros(layout.numel, dtype=torch.int64)
    for rank in range(world_size):
        lo, _ = layout.shard_range(rank)
        for segment in layout.segments(rank):
            slot = layout.slots[segment.slot]
            assert slot.offset + segment.param_start == lo + segment.start
            owned[lo + segment.start : lo + segment.stop] += 1
    for slot in layout.slots:
        assert torch.all(owned[slot.offset : slot.end] == 1)


def test_slot_offsets_do_not_depend_on_world_size():
    offsets = {ws: [s.offset for s in plan_buckets(_specs(SHAPES), world_size=ws)[0].slots] for ws in (1, 2, 4, 7)}
    assert len({tuple(v) for v in offsets.values()}) == 1


def test_buckets_split_by_group_dtype_and_cap_in_order():
    specs = (
        _specs([(10,), (10,)], group=0)
        + _specs([(4,)], group=0, dtype=torch.float64, start=2)
        + _specs([(50,), (50,), (50,)], group=1, start=3)
    )
    layouts = plan_buckets(specs, bucket_cap_numel=100)
    assert [(b.group, b.dtype, [s.index for s in b.slots]) for b in layouts] == [
        (0, torch.float32, [0, 1]),
        (0, torch.float64, [2]),
        (1, torch.float32, [3]),
        (1, torch.float32, [4]),
        (1, torch.float32, [5]),
    ]


def test_layout_is_pure_and_round_trips_through_plain_data():
    import json

    first = plan_buckets(_specs(SHAPES), world_size=4)
    again = plan_buckets(_specs(SHAPES), world_size=4)
    assert first == again
    restored = tuple(BucketLayout.from_dict(json.loads(json.dumps(b.to_dict()))) for b in first)
    assert restored == first


def test_invalid_world_size_and_rank_raise():
    with pytest.raises(ValueError, match="world_size"):
        plan_buckets(_specs(SHAPES), world_size=0)
    (layout,) = plan_buckets(_specs(SHAPES), world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        layout.shard_range(2)
