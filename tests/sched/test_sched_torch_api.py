"""shardoptim.sched as torch's own classes: the isinstance checks trainers make, torch's step-order
protocol and warnings, torch's messages, and torch's state dicts (old ones and torch.save'd ones)."""

from __future__ import annotations

import io
import types
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.optim.lr_scheduler as theirs

import shardoptim.sched as ours
from tests.sched.sched_oracle import CASES, Case, alone, make_optimizer, step_both

Caught = list[tuple[type[Warning], str, str]]


def _caught(action: Callable[[], Any]) -> Caught:
    """(category, message, file it is attributed to) of every warning ``action`` gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [(w.category, str(w.message), w.filename) for w in caught]


# --- isinstance: what Lightning and accelerate check --------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_every_scheduler_is_a_torch_lr_scheduler_with_torchs_step_count(case: Case) -> None:
    mine_opt, ref_opt = make_optimizer(case.optimizer), make_optimizer(case.optimizer)
    mine, ref = case.make(ours, mine_opt), case.make(theirs, ref_opt)
    assert isinstance(mine, theirs.LRScheduler)
    assert not isinstance(mine, theirs.ReduceLROnPlateau)
    for _ in range(7):
        for opt, scheduler in ((mine_opt, mine), (ref_opt, ref)):
            opt.step()
            scheduler.step()
    assert mine._step_count == ref._step_count  # accelerate reads it for OneCycleLR


def test_plateau_and_composites_are_what_torchs_are() -> None:
    opt = make_optimizer()
    made = {
        "plateau": (ours.ReduceLROnPlateau(opt), theirs.ReduceLROnPlateau(opt)),
        "chained": (
            ours.ChainedScheduler([ours.StepLR(opt, 3), ours.ExponentialLR(opt, 0.9)]),
            theirs.ChainedScheduler([theirs.StepLR(opt, 3), theirs.ExponentialLR(opt, 0.9)]),
        ),
        "sequential": (
            ours.SequentialLR(opt, [ours.StepLR(opt, 3), ours.ExponentialLR(opt, 0.9)], milestones=[4]),
            theirs.SequentialLR(opt, [theirs.StepLR(opt, 3), theirs.ExponentialLR(opt, 0.9)], milestones=[4]),
        ),
    }
    for name, (mine, ref) in made.items():
        for base in (theirs.LRScheduler, theirs.ReduceLROnPlateau):
            assert isinstance(mine, base) == isinstance(ref, base), (name, base)


def test_torchs_composites_refuse_our_plateau_as_they_refuse_theirs() -> None:
    for plateau_lib in (theirs, ours):
        opt = make_optimizer()
        with pytest.raises(ValueError, match="ReduceLROnPlateau"):
            theirs.ChainedScheduler([theirs.StepLR(opt, 3), plateau_lib.ReduceLROnPlateau(opt)])


# --- step order: torch's protocol, warnings, conditions ----------------------------------------


def _epochs(opt: Any, schedulers: list[Any], optimizer_first: bool, count: int = 3) -> Callable[[], None]:
    def run() -> None:
        for _ in range(count):
            if optimizer_first:
                opt.step()
            for scheduler in schedulers:
                scheduler.step()
            if not optimizer_first:
                opt.step()

    return run


def _override_step(opt: Any) -> None:
    """What a user (or a library) does: replace ``step`` on the instance, calling the old one."""
    old_step = opt.step
    opt.step = types.MethodType(lambda self, *args, **kwargs: old_step(*args, **kwargs), opt)


def _resumable(opt: Any) -> Any:
    for group in opt.param_groups:
        group["initial_lr"] = 0.01
    return opt


# (name, run(lib, optimizer) -> warnings): each is run on ours and on torch's.
SCENARIOS: list[tuple[str, Callable[[Any, Any], Caught]]] = [
    ("optimizer first", lambda lib, opt: _caught(_epochs(opt, [lib.StepLR(opt, 3)], True))),
    ("scheduler first", lambda lib, opt: _caught(_epochs(opt, [lib.StepLR(opt, 3)], False))),
    ("resumed, scheduler first",
     lambda lib, opt: _caught(_epochs(_resumable(opt), [lib.StepLR(opt, 3, last_epoch=10)], False))),
    ("step overridden, optimizer first", lambda lib, opt: _overridden(lib, opt, optimizer_first=True)),
    ("step overridden, scheduler first", lambda lib, opt: _overridden(lib, opt, optimizer_first=False)),
    ("epoch argument", lambda lib, opt: _with_epoch(lib.ExponentialLR(opt, gamma=0.9))),
    ("sequential", lambda lib, opt: _caught(
        _epochs(opt, [lib.SequentialLR(opt, [lib.LinearLR(opt), lib.ExponentialLR(opt, 0.9)], [2])], True, 5))),
]


def _overridden(lib: Any, opt: Any, optimizer_first: bool) -> Caught:
    scheduler = lib.CosineAnnealingLR(opt, T_max=10)
    _override_step(opt)
    return _caught(_epochs(opt, [scheduler], optimizer_first))


def _with_epoch(scheduler: Any) -> Caught:
    def run() -> None:
        scheduler.optimizer.step()
        scheduler.step(4)

    return _caught(run)


@pytest.mark.parametrize("scenario", [s[1] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_warnings_are_torchs(scenario: Callable[[Any, Any], Caught]) -> None:
    mine = scenario(ours, make_optimizer())
    assert mine == scenario(theirs, make_optimizer())


class PlainOptimizer:
    """Not a torch optimizer: param_groups and step() only."""

    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.1}, {"lr": 0.03}]

    def step(self) -> None:
        pass


@pytest.mark.parametrize("scenario", [s[1] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_any_object_with_step_gets_the_warnings_torch_gives_for_its_optimizers(scenario) -> None:
    assert scenario(ours, PlainOptimizer()) == scenario(theirs, make_optimizer())


@pytest.mark.parametrize("optimizer_first", [True, False], ids=["optimizer first", "scheduler first"])
@pytest.mark.parametrize("created_first", ["ours", "torch"])
def test_ours_and_torchs_on_one_optimizer_warn_as_two_of_torchs(created_first: str, optimizer_first: bool) -> None:
    def run(libs: tuple[Any, Any]) -> Caught:
        opt = make_optimizer()
        schedulers = [lib.ExponentialLR(opt, gamma=0.9) for lib in libs]
        return _caught(_epochs(opt, schedulers, optimizer_first))

    libs = (ours, theirs) if created_first == "ours" else (theirs, ours)
    assert run(libs) == run((theirs, theirs))


class SlottedOptimizer:
    """Refuses new attributes: its step cannot be wrapped."""

    __slots__ = ("param_groups",)

    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.1}, {"lr": 0.03}]

    def step(self) -> None:
        pass


@pytest.mark.parametrize("optimizer_first", [True, False])
def test_an_optimizer_refusing_the_wrapper_is_scheduled_without_order_warnings(optimizer_first: bool) -> None:
    opt = SlottedOptimizer()
    scheduler = ours.StepLR(opt, step_size=2)
    ref_opt = make_optimizer()
    ref = theirs.StepLR(ref_opt, step_size=2)
    assert _caught(_epochs(opt, [scheduler], optimizer_first)) == []
    _epochs(ref_opt, [ref], True)()
    assert scheduler.get_last_lr() == ref.get_last_lr()


def test_epoch_warning_is_torchs_constant() -> None:
    assert ours.EPOCH_DEPRECATION_WARNING is theirs.EPOCH_DEPRECATION_WARNING
    plateau_warnings = []
    for lib in (ours, theirs):
        scheduler = lib.ReduceLROnPlateau(make_optimizer())
        plateau_warnings.append(_caught(lambda scheduler=scheduler: scheduler.step(1.0, epoch=3)))
    assert plateau_warnings[0] == plateau_warnings[1]
    assert [message for _, message, _ in plateau_warnings[0]] == [theirs.EPOCH_DEPRECATION_WARNING]


def _user_scheduler(base: type) -> type:
    """A user's scheduler written the way torch's own are, reading torch's in-step flag."""

    class HalvingEachStep(base):
        def get_lr(self) -> list[float]:
            if not self._get_lr_called_within_step:
                warnings.warn("get_lr called outside step()", UserWarning)
            return [group["lr"] * (0.5 if self.last_epoch > 0 else 1.0) for group in self.optimizer.param_groups]

    return HalvingEachStep


def test_a_user_scheduler_reading_torchs_flags_behaves_on_our_base_as_on_torchs() -> None:
    seen = []
    for base in (ours.LRScheduler, theirs.LRScheduler):
        opt = make_optimizer()
        holder: list[Any] = []

        def run(opt=opt, base=base, holder=holder) -> None:
            holder.append(_user_scheduler(base)(opt))
            _epochs(opt, holder, True)()
            holder[0].get_lr()

        seen.append((_caught(run), holder[0].get_last_lr(), holder[0]._is_initial))
    assert seen[0] == seen[1]


# --- messages of errors ---------------------------------------------------------------------------


def test_plateau_group_count_error_is_torchs() -> None:
    messages = []
    for lib in (ours, theirs):
        opt = make_optimizer()
        scheduler = lib.ReduceLROnPlateau(opt, patience=0, min_lr=[0.001, 0.002])
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
        scheduler.step(1.0)
        with pytest.raises(RuntimeError) as error:
            scheduler.step(2.0)
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_resume_without_initial_lr_says_what_torch_says() -> None:
    messages = []
    for lib in (theirs, ours):
        with pytest.raises(KeyError) as error:
            lib.StepLR(make_optimizer(), step_size=3, last_epoch=1)
        messages.append(str(error.value))
    first_clause = messages[0][: messages[0].index("last_epoch >= 0") + len("last_epoch >= 0")]
    assert first_clause in messages[1]


# --- torch's state dicts --------------------------------------------------------------------------


def _torch_saved(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``, as trainers store it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_checkpoint_through_torch_save_resumes_like_torch(case: Case) -> None:
    mine_opt, ref_opt = make_optimizer(case.optimizer), make_optimizer(case.optimizer)
    mine, ref = (mine_opt, alone(ours, mine_opt, case)), (ref_opt, alone(theirs, ref_opt, case))
    step_both(mine, ref, range(30))
    saved_optimizer, saved_scheduler = _torch_saved(mine_opt.state_dict()), _torch_saved(mine[1][0].state_dict())
    fresh_opt = make_optimizer(case.optimizer)
    fresh = case.make(ours, fresh_opt)
    fresh_opt.load_state_dict(saved_optimizer)
    fresh.load_state_dict(saved_scheduler)
    step_both((fresh_opt, [fresh]), ref, range(30, 60))


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_one_cycle_loads_torchs_state_dict_from_before_it_named_the_strategy(strategy: str) -> None:
    """torch before 2.2 stored the annealing function itself (``anneal_func``)."""
    kwargs = {"max_lr": 0.5, "total_steps": 40, "anneal_strategy": strategy}
    ref_opt = make_optimizer()
    ref = theirs.OneCycleLR(ref_opt, **kwargs)
    for _ in range(12):
        ref_opt.step()
        ref.step()
    legacy = ref.state_dict()
    del legacy["_anneal_func_type"]
    legacy["anneal_func"] = getattr(theirs.OneCycleLR, f"_annealing_{strategy}")
    mine_opt = make_optimizer()
    other = "linear" if strategy == "cos" else "cos"
    mine = ours.OneCycleLR(mine_opt, max_lr=0.1, total_steps=40, anneal_strategy=other)
    mine_opt.load_state_dict(ref_opt.state_dict())
    mine.load_state_dict(legacy)
    assert "anneal_func" not in mine.state_dict()
    step_both((mine_opt, [mine]), (ref_opt, [ref]), range(12, 39))


def test_one_cycle_refuses_an_unknown_legacy_annealing_function() -> None:
    scheduler = ours.OneCycleLR(make_optimizer(), max_lr=0.1, total_steps=10)
    state = {k: v for k, v in scheduler.state_dict().items() if k != "_anneal_func_type"}
    with pytest.raises(ValueError, match="anneal_func"):
        scheduler.load_state_dict({**state, "anneal_func": abs})
