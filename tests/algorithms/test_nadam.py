"""NAdam beyond the generic table: ``mu_product`` under a changing ``beta1``."""

from __future__ import annotations

import math

import pytest
import torch

from shardoptim.algorithms import nadam
from shardoptim.core import HyperParams
from tests.algorithms.cases import BY_NAME, run
from tests.oracle import assert_same_state, assert_same_trajectory


@pytest.mark.parametrize("implementation", ["default", "for-loop", "foreach"])
def test_nadam_mu_product_is_a_running_product(implementation):
    """torch multiplies ``mu_product`` by each step's momentum coefficient, with the ``beta1`` of that
    step; a product recomputed from the current ``beta1`` would differ once a scheduler moved it."""

    def cycle_beta1(step, *optimizers):
        for opt in optimizers:
            opt.param_groups[0]["betas"] = (0.9 - 0.3 * abs(math.sin(step / 4)), 0.999)

    ours, theirs, our_opt, their_opt = run("NAdam", BY_NAME["NAdam"].main[0], implementation, between=cycle_beta1)
    assert_same_trajectory(ours, theirs, torch.float32)
    assert_same_state(our_opt.state_dict(), their_opt.state_dict())
    h = HyperParams.of(their_opt.param_groups[0])
    closed_form = float(nadam.scalar_state(h, 50)["mu_product"])
    assert not math.isclose(closed_form, their_opt.state[theirs[0]]["mu_product"].item(), rel_tol=1e-3)
