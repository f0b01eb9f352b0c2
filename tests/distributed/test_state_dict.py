"""Sharded state_dict(): gathered to torch's full format; load_state_dict() keeps each rank's slice."""

from __future__ import annotations

import pytest

from . import scenarios
from .scenarios import shardable_algorithms


@pytest.mark.parametrize("name", shardable_algorithms())
def test_round_trips_two_ranks(worlds, name):
    worlds.get(2).run(scenarios.state_dict_round_trips, name)


def test_round_trips_four_ranks(worlds):
    worlds.get(4).run(scenarios.state_dict_round_trips, "Adam")
