"""Every case of the table against torch.optim.lr_scheduler, epoch by epoch, in every layout."""

from __future__ import annotations

import math
import warnings

import pytest
import torch.optim.lr_scheduler as theirs

import shardoptim.sched as ours
from tests.sched.sched_oracle import (
    CASES,
    EPOCHS,
    LAYOUTS,
    MIDWAY,
    RTOL,
    Case,
    alone,
    assert_same_groups,
    json_round_trip,
    make_optimizer,
    step_both,
)

ROUND_TRIP_LAYOUTS = [
    layout for layout in LAYOUTS if layout.__name__ in ("alone", "sequential_into", "chained_scheduler")
]


def _start(case: Case, layout):
    mine_opt, ref_opt = make_optimizer(case.optimizer), make_optimizer(case.optimizer)
    mine = (mine_opt, layout(ours, mine_opt, case))
    ref = (ref_opt, layout(theirs, ref_opt, case))
    assert_same_groups(mine_opt, ref_opt, "after construction")
    return mine, ref


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_matches_torch(case: Case, layout) -> None:
    mine, ref = _start(case, layout)
    step_both(mine, ref, range(EPOCHS))


@pytest.mark.parametrize("source", ["ours", "torch"])
@pytest.mark.parametrize("layout", ROUND_TRIP_LAYOUTS, ids=lambda layout: layout.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_state_dict_round_trip_midway(case: Case, layout, source: str) -> None:
    """Save midway (ours through JSON, or torch's own state), restore into a fresh scheduler of
    ours on a fresh optimizer, and continue in step with the uninterrupted torch run."""
    mine, ref = _start(case, layout)
    step_both(mine, ref, range(MIDWAY))
    saved_from = mine if source == "ours" else ref
    opt_state = saved_from[0].state_dict()
    sched_states = [json_round_trip(s.state_dict()) if source == "ours" else s.state_dict() for s in saved_from[1]]

    fresh_opt = make_optimizer(case.optimizer)
    fresh = layout(ours, fresh_opt, case)
    fresh_opt.load_state_dict(opt_state)
    for scheduler, state in zip(fresh, sched_states, strict=True):
        scheduler.load_state_dict(state)
    assert_same_groups(fresh_opt, ref[0], "after loading")
    step_both((fresh_opt, fresh), ref, range(MIDWAY, EPOCHS))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_explicit_epoch_uses_closed_form_like_torch(case: Case) -> None:
    """The deprecated step(epoch) jumps around like torch's (closed form where torch has one)."""
    mine, ref = _start(case, alone)
    caught: dict = {}
    for epoch in [3, 4, 17, 16, 40, 41, 90, 0, 150, 151, 152]:
        for opt, (scheduler,) in (mine, ref):
            opt.step()
            with warnings.catch_warnings(record=True) as caught[opt]:
                warnings.simplefilter("always")
                scheduler.step(epoch)
        assert [str(w.message)[:32] for w in caught[mine[0]]] == [str(w.message)[:32] for w in caught[ref[0]]]
        assert_same_groups(mine[0], ref[0], f"step({epoch})")
        step_both(mine, ref, range(2))


# (case, resumed from last_epoch, steps): long chainable runs, or the end of one.
LONG_RUNS = [
    (Case("CosineAnnealingLR", {"T_max": 5}), -1, 8000),
    (Case("CosineAnnealingLR", {"T_max": 40, "eta_min": 0.001}), -1, 8000),
    (Case("LinearLR", {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 100000}), 99000, 1000),
    (Case("PolynomialLR", {"total_iters": 100000, "power": 2.0}), 99000, 1000),
    (Case("ExponentialLR", {"gamma": 0.9995}), -1, 8000),
]


@pytest.mark.parametrize("case, last_epoch, steps", LONG_RUNS, ids=lambda value: getattr(value, "id", str(value)))
def test_long_runs_stay_within_rounding_of_torch(case: Case, last_epoch: int, steps: int) -> None:
    """Where torch's recursive form evaluates a ratio its own way, rounding differences could
    pile up over many chainable steps; ours evaluates such ratios torch's way."""
    mine_opt, ref_opt = make_optimizer(case.optimizer), make_optimizer(case.optimizer)
    schedulers = []
    for lib, opt in ((ours, mine_opt), (theirs, ref_opt)):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        schedulers.append(getattr(lib, case.name)(opt, **case.kwargs, last_epoch=last_epoch))
        opt.step()
    for epoch in range(steps):
        for scheduler in schedulers:
            scheduler.step()
        for g, r in zip(mine_opt.param_groups, ref_opt.param_groups, strict=True):
            assert math.isclose(g["lr"], r["lr"], rel_tol=RTOL, abs_tol=0.0), f"step {epoch}: {g['lr']} != {r['lr']}"
