"""Per-rank optimizer state: the unsharded total divided by the world size, plus padding."""

from __future__ import annotations

import pytest

from . import scenarios

MiB = 1 << 20


@pytest.mark.parametrize("size", [2, 4])
def test_state_is_one_nth_plus_padding(worlds, size):
    for numbers in worlds.get(size).run(scenarios.state_bytes):
        flat_state = numbers["per_rank"] - numbers["steps"]  # ``step`` counters are per parameter, everywhere
        assert flat_state * size == numbers["padded"]
        # Padding: at most one alignment unit per parameter, and one per rank at the end of the bucket.
        assert numbers["padded"] - numbers["total"] <= 2 * 4 * 16 * (numbers["slots"] + size)
        assert numbers["per_rank"] <= 1.01 * numbers["total"] / size + MiB
