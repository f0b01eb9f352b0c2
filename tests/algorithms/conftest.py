"""Settings for the algorithm tests."""

import pytest
import torch._dynamo


@pytest.fixture(autouse=True, scope="session")
def _fresh_compiler_caches():
    """Start these tests with empty compiler caches, so graphs compiled by earlier test directories do
    not count towards torch.compile's limit of 8 graphs per update (these tests stay within it)."""
    torch._dynamo.reset()
    yield
