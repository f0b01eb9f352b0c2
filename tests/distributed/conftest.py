"""Fixtures that start real gloo process groups on loopback."""

from __future__ import annotations

import pytest

from .world import Worlds


@pytest.fixture(scope="session")
def worlds():
    pool = Worlds()
    yield pool
    pool.close()
