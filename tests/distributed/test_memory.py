"""Per-rank memory: ``memory_report()`` against the tensors themselves and against (4 + 8) x P / N."""

from __future__ import annotations

import pytest

from . import scenarios

ALIGNMENT_BYTES = 4 * 16


@pytest.mark.parametrize("shard_grads", [False, True], ids=["zero1", "zero2"])
@pytest.mark.parametrize("size", [2, 4])
def test_memory_report_matches_tensors_and_bound(worlds, size, shard_grads):
    for rank, numbers in enumerate(worlds.get(size).run(scenarios.memory_of_adam, shard_grads)):
        params, grads, state, padding = numbers["report"][rank]
        assert (grads, state) == numbers["mine"] == numbers["measured"], "the report must be what the tensors hold"
        elements, slots, buckets = numbers["elements"], numbers["slots"], numbers["buckets"]
        # Padding: at most one alignment unit per parameter, and one per rank at each bucket's end.
        slack = ALIGNMENT_BYTES * (slots + size * buckets)
        steps = 4 * slots  # a float32 step count per parameter, on every rank
        assert state <= 8 * elements / size + 2 * slack + steps
        if shard_grads:
            assert grads <= 4 * elements / size + slack, "ZeRO-2: a shard of the gradient, no full buffer"
            assert all(numbers["grads_after_step"]), ".grad is None after step() under shard_grads"
            assert grads + state <= 12 * elements / size + 3 * slack + steps
        else:
            assert grads >= 4 * elements
        assert numbers["largest"] < 1.01
