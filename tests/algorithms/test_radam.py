"""RAdam beyond the generic table: both of its regimes fall within the tested steps."""

from __future__ import annotations

from shardoptim.algorithms import radam
from shardoptim.core import HyperParams


def test_radam_runs_both_regimes_within_the_tested_steps():
    """RAdam's plain step (rho_t <= 5) comes first and its rectified step later, so 50 steps test both."""
    h = HyperParams.of(dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.0))
    first, last = radam.scalars(h, 1), radam.scalars(h, 50)
    assert first.adaptive_step == 0 and first.plain_step < 0
    assert last.plain_step == 0 and last.adaptive_step < 0
