"""State dicts (JSON, torch's format), tensor lrs, resuming with last_epoch, and optimizers other than
torch's (a duck-typed one and shardoptim's own)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.optim.lr_scheduler as theirs

import shardoptim
import shardoptim.sched as ours
from tests.sched.sched_oracle import (
    CASES,
    Case,
    alone,
    assert_same_groups,
    json_round_trip,
    make_optimizer,
    step_both,
)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_state_dict_is_plain_json(case: Case) -> None:
    opt = make_optimizer(case.optimizer)
    scheduler = case.make(ours, opt)
    for _ in range(5):
        opt.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert json_round_trip(state) == state
    assert "optimizer" not in state
    assert not {"_get_lr_called_within_step", "_is_initial"} & set(state)


def test_multistep_milestones_are_sorted_pairs_and_load_from_any_form() -> None:
    opt = make_optimizer()
    scheduler = ours.MultiStepLR(opt, milestones=[40, 10, 40], gamma=0.5)
    assert scheduler.state_dict()["milestones"] == [[10, 1], [40, 2]]
    for form in (Counter({10: 1, 40: 2}), {"10": 1, "40": 2}, [[10, 1], [40, 2]], [40, 10, 40]):
        other = ours.MultiStepLR(make_optimizer(), milestones=[3])
        other.load_state_dict({**scheduler.state_dict(), "milestones": form})
        assert other.milestones == Counter({10: 1, 40: 2})


class ScaledDecay:
    """A callable object: its attributes are saved, unlike a function's."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, epoch: int) -> float:
        return self.rate**epoch


@pytest.mark.parametrize("name", ["LambdaLR", "MultiplicativeLR"])
@pytest.mark.parametrize("source", ["ours", "torch"])
def test_callable_object_state_is_saved_and_restored(name: str, source: str) -> None:
    lib = ours if source == "ours" else theirs
    saved = getattr(lib, name)(make_optimizer(), lr_lambda=[ScaledDecay(0.5), ScaledDecay(0.9)]).state_dict()
    target_fns = [ScaledDecay(0.1), ScaledDecay(0.2)]
    target = getattr(ours, name)(make_optimizer(), lr_lambda=target_fns)
    target.load_state_dict(saved)
    assert [fn.rate for fn in target_fns] == [0.5, 0.9]
    assert "lr_lambdas" in saved  # loading did not consume the caller's dict


def test_function_lambdas_are_not_saved() -> None:
    scheduler = ours.LambdaLR(make_optimizer(), lr_lambda=lambda epoch: 0.5)
    assert scheduler.state_dict()["lr_lambdas"] == [None, None]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_tensor_lr_is_updated_in_place_like_torch(case: Case) -> None:
    mine_opt = make_optimizer(case.optimizer, lr=torch.tensor)
    ref_opt = make_optimizer(case.optimizer, lr=torch.tensor)
    tensors = [group["lr"] for group in mine_opt.param_groups]
    mine, ref = (mine_opt, alone(ours, mine_opt, case)), (ref_opt, alone(theirs, ref_opt, case))
    step_both(mine, ref, range(60))
    assert all(group["lr"] is t for group, t in zip(mine_opt.param_groups, tensors, strict=True))
    assert all(isinstance(lr, torch.Tensor) for lr in mine[1][0].get_last_lr())
    # Through JSON the lrs become numbers; loading gives them back the types the scheduler holds.
    state = json_round_trip(mine[1][0].state_dict())
    fresh_opt = make_optimizer(case.optimizer, lr=torch.tensor)
    fresh = case.make(ours, fresh_opt)
    types_before = [type(lr) for lr in fresh.base_lrs + fresh.get_last_lr()]
    fresh_opt.load_state_dict(mine_opt.state_dict())
    fresh.load_state_dict(state)
    assert [type(lr) for lr in fresh.base_lrs + fresh.get_last_lr()] == types_before
    step_both((fresh_opt, [fresh]), ref, range(60, 120))


RESUMABLE = [case for case in CASES if case.name not in ("LambdaLR", "MultiplicativeLR")]


@pytest.mark.parametrize("case", RESUMABLE, ids=lambda case: case.id)
def test_resume_with_last_epoch_like_torch(case: Case) -> None:
    """A second scheduler created with last_epoch >= 0 picks up where torch's would."""
    mine_opt, ref_opt = make_optimizer(case.optimizer), make_optimizer(case.optimizer)
    mine, ref = (mine_opt, alone(ours, mine_opt, case)), (ref_opt, alone(theirs, ref_opt, case))
    step_both(mine, ref, range(30))
    resumed = (mine_opt, [getattr(ours, case.name)(mine_opt, **case.kwargs, last_epoch=30)])
    resumed_ref = (ref_opt, [getattr(theirs, case.name)(ref_opt, **case.kwargs, last_epoch=30)])
    assert_same_groups(mine_opt, ref_opt, "after resuming")
    step_both(resumed, resumed_ref, range(31, 100))


def test_resume_without_initial_lr_is_a_key_error() -> None:
    for lib in (ours, theirs):
        with pytest.raises(KeyError):
            lib.StepLR(make_optimizer(), step_size=3, last_epoch=4)


class PlainOptimizer:
    """Not a torch optimizer: only param_groups and step()."""

    def __init__(self, param_groups: list[dict]) -> None:
        self.param_groups = param_groups
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


def _plain_copy(optimizer: torch.optim.Optimizer) -> PlainOptimizer:
    return PlainOptimizer([dict(group) for group in optimizer.param_groups])


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_drives_any_object_with_param_groups(case: Case) -> None:
    plain = _plain_copy(make_optimizer(case.optimizer))
    ref_opt = make_optimizer(case.optimizer)
    mine, ref = (plain, alone(ours, plain, case)), (ref_opt, alone(theirs, ref_opt, case))
    step_both(mine, ref, range(80))
    assert plain.steps == 1  # our wrapper called through to the real step


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("OneCycleLR", "CyclicLR", "CosineAnnealingLR")][::2],
                         ids=lambda case: case.id)
def test_drives_shardoptim_optimizers(case: Case) -> None:
    """Our own optimizers (flat buckets) are scheduled like torch's, momentum/betas included."""
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    groups = [{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.03}]
    if case.optimizer == "sgd":
        mine_opt = shardoptim.SGD(groups, lr=0.1, momentum=0.9)
    else:
        mine_opt = shardoptim.Adam(groups, lr=0.1)
    ref_opt = make_optimizer(case.optimizer)
    mine, ref = (mine_opt, alone(ours, mine_opt, case)), (ref_opt, alone(theirs, ref_opt, case))
    for p in params:
        p.grad = torch.ones_like(p)
    step_both(mine, ref, range(100))


def test_state_dict_keys_match_torch() -> None:
    """Our state holds what torch's holds (less torch's transient flags), under the same names."""
    for case in CASES:
        mine = case.make(ours, make_optimizer(case.optimizer)).state_dict()
        ref = case.make(theirs, make_optimizer(case.optimizer)).state_dict()
        transient = {"_get_lr_called_within_step", "_is_initial", "_scale_fn_ref"}
        assert set(mine) == set(ref) - transient, case.id


def test_json_accepts_infinite_best() -> None:
    scheduler = ours.ReduceLROnPlateau(make_optimizer())
    assert json.loads(json.dumps(scheduler.state_dict()))["best"] == float("inf")


def _halving_every_third(base: type) -> type:
    """A user's scheduler written against the LRScheduler contract, on either library's base."""

    class HalvingEveryThird(base):
        def get_lr(self) -> list[float]:
            return [lr * 0.5 ** (self.last_epoch // 3) for lr in self.base_lrs]

    return HalvingEveryThird


def test_user_subclass_of_the_base_behaves_like_torch() -> None:
    mine_opt, ref_opt = make_optimizer(), make_optimizer()
    mine = (mine_opt, [_halving_every_third(ours.LRScheduler)(mine_opt)])
    ref = (ref_opt, [_halving_every_third(theirs.LRScheduler)(ref_opt)])
    step_both(mine, ref, range(20))
    resumed = _halving_every_third(ours.LRScheduler)(make_optimizer())
    resumed.load_state_dict(json_round_trip(mine[1][0].state_dict()))
    assert resumed.last_epoch == ref[1][0].last_epoch == 20
