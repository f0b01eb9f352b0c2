"""Bad arguments raise what torch raises; the warnings torch gives, we give."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.optim.lr_scheduler as theirs

import shardoptim.sched as ours
from tests.sched.sched_oracle import make_optimizer


def _plateau(lib: Any, opt: Any) -> Any:
    return lib.ReduceLROnPlateau(opt)


def _other_optimizer_child(lib: Any, opt: Any) -> Any:
    return lib.StepLR(make_optimizer(), step_size=3)


class _NoOptimizer:
    def step(self) -> None:
        pass


def _adagrad() -> torch.optim.Optimizer:
    return torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


def _past_total_steps(lib: Any, opt: Any) -> None:
    scheduler = lib.OneCycleLR(opt, max_lr=0.1, total_steps=3)
    for _ in range(4):
        opt.step()
        scheduler.step()


# (description, build(lib, opt), exception). Each is run on ours and on torch's.
TORCH_REJECTS: list[tuple[str, Callable[[Any, Any], Any], type[Exception]]] = [
    ("not an optimizer", lambda lib, opt: lib.StepLR(object(), step_size=3), TypeError),
    ("lambda count", lambda lib, opt: lib.LambdaLR(opt, lr_lambda=[lambda e: 1.0]), ValueError),
    ("lambda not callable", lambda lib, opt: lib.LambdaLR(opt, lr_lambda=3), TypeError),
    ("multiplicative count", lambda lib, opt: lib.MultiplicativeLR(opt, lr_lambda=[lambda e: 1.0] * 3), ValueError),
    ("multiplicative not callable", lambda lib, opt: lib.MultiplicativeLR(opt, lr_lambda=0.9), TypeError),
    ("constant factor > 1", lambda lib, opt: lib.ConstantLR(opt, factor=1.5), ValueError),
    ("constant factor < 0", lambda lib, opt: lib.ConstantLR(opt, factor=-0.1), ValueError),
    ("linear start 0", lambda lib, opt: lib.LinearLR(opt, start_factor=0), ValueError),
    ("linear start > 1", lambda lib, opt: lib.LinearLR(opt, start_factor=1.5), ValueError),
    ("linear end < 0", lambda lib, opt: lib.LinearLR(opt, end_factor=-0.5), ValueError),
    ("sequential empty", lambda lib, opt: lib.SequentialLR(opt, [], milestones=[]), ValueError),
    ("sequential other optimizer",
     lambda lib, opt: lib.SequentialLR(opt, [lib.StepLR(opt, 3), _other_optimizer_child(lib, opt)], [5]), ValueError),
    ("sequential plateau", lambda lib, opt: lib.SequentialLR(opt, [lib.StepLR(opt, 3), _plateau(lib, opt)], [5]),
     ValueError),
    ("sequential milestone count",
     lambda lib, opt: lib.SequentialLR(opt, [lib.StepLR(opt, 3), lib.StepLR(opt, 4)], [5, 9]), ValueError),
    ("sequential child without optimizer", lambda lib, opt: lib.SequentialLR(opt, [_NoOptimizer()], []), TypeError),
    ("chained empty", lambda lib, opt: lib.ChainedScheduler([]), ValueError),
    ("chained other optimizer",
     lambda lib, opt: lib.ChainedScheduler([lib.StepLR(opt, 3), _other_optimizer_child(lib, opt)]), ValueError),
    ("chained plateau", lambda lib, opt: lib.ChainedScheduler([lib.StepLR(opt, 3), _plateau(lib, opt)]), ValueError),
    ("chained child without optimizer",
     lambda lib, opt: lib.ChainedScheduler([lib.StepLR(opt, 3), _NoOptimizer()]), TypeError),
    ("plateau factor", lambda lib, opt: lib.ReduceLROnPlateau(opt, factor=1.0), ValueError),
    ("plateau mode", lambda lib, opt: lib.ReduceLROnPlateau(opt, mode="avg"), ValueError),
    ("plateau threshold mode", lambda lib, opt: lib.ReduceLROnPlateau(opt, threshold_mode="pct"), ValueError),
    ("plateau min_lr count", lambda lib, opt: lib.ReduceLROnPlateau(opt, min_lr=[0.1]), ValueError),
    ("plateau not an optimizer", lambda lib, opt: lib.ReduceLROnPlateau(None), TypeError),
    ("cyclic mode", lambda lib, opt: lib.CyclicLR(opt, 0.01, 0.1, mode="square"), ValueError),
    ("cyclic base_lr count", lambda lib, opt: lib.CyclicLR(opt, [0.01], 0.1), ValueError),
    ("cyclic max_momentum count", lambda lib, opt: lib.CyclicLR(opt, 0.01, 0.1, max_momentum=[0.9] * 3), ValueError),
    ("cyclic no momentum", lambda lib, opt: lib.CyclicLR(_adagrad(), 0.01, 0.1), ValueError),
    ("one-cycle no length", lambda lib, opt: lib.OneCycleLR(opt, max_lr=0.1), ValueError),
    ("one-cycle total_steps 0", lambda lib, opt: lib.OneCycleLR(opt, max_lr=0.1, total_steps=0), ValueError),
    ("one-cycle total_steps float", lambda lib, opt: lib.OneCycleLR(opt, max_lr=0.1, total_steps=10.0), ValueError),
    ("one-cycle epochs", lambda lib, opt: lib.OneCycleLR(opt, max_lr=0.1, epochs=0, steps_per_epoch=3), ValueError),
    ("one-cycle steps_per_epoch",
     lambda lib, opt: lib.OneCycleLR(opt, max_lr=0.1, epochs=2, steps_per_epoch=-3), ValueError),
    ("one-cycle pct_start > 1", lambda lib, opt: lib.OneCycleLR(opt, 0.1, total_steps=9, pct_start=1.5), ValueError),
    ("one-cycle pct_start int", lambda lib, opt: lib.OneCycleLR(opt, 0.1, total_steps=9, pct_start=0), ValueError),
    ("one-cycle anneal", lambda lib, opt: lib.OneCycleLR(opt, 0.1, total_steps=9, anneal_strategy="exp"), ValueError),
    ("one-cycle no momentum", lambda lib, opt: lib.OneCycleLR(_adagrad(), 0.1, total_steps=9), ValueError),
    ("one-cycle max_lr count", lambda lib, opt: lib.OneCycleLR(opt, [0.1] * 3, total_steps=9), ValueError),
    ("one-cycle past total_steps", _past_total_steps, ValueError),
    ("restarts T_0 0", lambda lib, opt: lib.CosineAnnealingWarmRestarts(opt, T_0=0), ValueError),
    ("restarts T_0 float", lambda lib, opt: lib.CosineAnnealingWarmRestarts(opt, T_0=2.5), ValueError),
    ("restarts T_mult 0", lambda lib, opt: lib.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=0), ValueError),
    ("restarts T_mult float", lambda lib, opt: lib.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=1.5), ValueError),
    ("restarts eta_min", lambda lib, opt: lib.CosineAnnealingWarmRestarts(opt, T_0=5, eta_min="0"), ValueError),
    ("restarts negative epoch", lambda lib, opt: lib.CosineAnnealingWarmRestarts(opt, T_0=5).step(-1), ValueError),
]

# Arguments torch accepts but that make no schedule (torch crashes later, divides by zero, or
# silently misbehaves); we reject them up front with the error type torch uses for bad arguments.
ONLY_WE_REJECT: list[tuple[str, Callable[[Any, Any], Any], type[Exception]]] = [
    ("cosine negative T_max", lambda lib, opt: lib.CosineAnnealingLR(opt, T_max=-5), ValueError),
    ("cosine zero T_max", lambda lib, opt: lib.CosineAnnealingLR(opt, T_max=0), ValueError),
    ("step zero step_size", lambda lib, opt: lib.StepLR(opt, step_size=0), ValueError),
    ("step fractional step_size", lambda lib, opt: lib.StepLR(opt, step_size=2.5), ValueError),
    ("linear zero total_iters", lambda lib, opt: lib.LinearLR(opt, total_iters=0), ValueError),
    ("polynomial zero total_iters", lambda lib, opt: lib.PolynomialLR(opt, total_iters=0), ValueError),
    ("constant negative total_iters", lambda lib, opt: lib.ConstantLR(opt, total_iters=-1), ValueError),
    ("sequential decreasing milestones",
     lambda lib, opt: lib.SequentialLR(opt, [lib.StepLR(opt, 3), lib.StepLR(opt, 4), lib.StepLR(opt, 5)], [9, 5]),
     ValueError),
    ("cyclic zero step_size_up", lambda lib, opt: lib.CyclicLR(opt, 0.01, 0.1, step_size_up=0), ValueError),
    ("cyclic scale_mode", lambda lib, opt: lib.CyclicLR(opt, 0.01, 0.1, scale_fn=abs, scale_mode="epoch"), ValueError),
]


@pytest.mark.parametrize("build, error", [case[1:] for case in TORCH_REJECTS], ids=[case[0] for case in TORCH_REJECTS])
def test_rejects_what_torch_rejects(build: Callable[[Any, Any], Any], error: type[Exception]) -> None:
    for lib in (theirs, ours):
        with pytest.raises(error):
            build(lib, make_optimizer())


@pytest.mark.parametrize(
    "build, error", [case[1:] for case in ONLY_WE_REJECT], ids=[case[0] for case in ONLY_WE_REJECT]
)
def test_rejects_arguments_that_make_no_schedule(build: Callable[[Any, Any], Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        build(ours, make_optimizer())


def _warnings_of(action: Callable[[], Any]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught]


class PlainOptimizer:
    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.1}, {"lr": 0.01}]

    def step(self) -> None:
        pass


def _first_epoch_warnings(lib: Any, opt: Any, optimizer_first: bool) -> list[str]:
    """Warnings about the step order from a scheduler's first two epochs."""
    scheduler = lib.StepLR(opt, step_size=3)

    def epoch() -> None:
        if optimizer_first:
            opt.step()
        scheduler.step()

    messages = _warnings_of(epoch) + _warnings_of(epoch)
    return [message for message in messages if "before `optimizer.step()`" in message]


@pytest.mark.parametrize("optimizer_first", [True, False])
def test_warns_when_stepped_before_the_optimizer(optimizer_first: bool) -> None:
    mine = _first_epoch_warnings(ours, make_optimizer(), optimizer_first)
    ref = _first_epoch_warnings(theirs, make_optimizer(), optimizer_first)
    assert len(mine) == len(ref) == (0 if optimizer_first else 1)
    assert all(m.startswith("Detected call of `lr_scheduler.step()` before `optimizer.step()`") for m in mine)


@pytest.mark.parametrize("optimizer_first", [True, False])
def test_warns_about_step_order_on_any_object_with_step(optimizer_first: bool) -> None:
    messages = _first_epoch_warnings(ours, PlainOptimizer(), optimizer_first)
    assert len(messages) == (0 if optimizer_first else 1)


def test_warns_when_a_wrapped_step_is_replaced_on_any_object_with_step() -> None:
    opt = PlainOptimizer()
    scheduler = ours.ExponentialLR(opt, gamma=0.9)
    opt.step = lambda: None
    opt.step()
    assert any("has been overridden" in message for message in _warnings_of(scheduler.step))


@pytest.mark.parametrize("lib", [ours, theirs], ids=["ours", "torch"])
def test_several_schedulers_wrap_one_optimizer_once(lib: Any) -> None:
    opt = make_optimizer()
    for _ in range(3):
        lib.StepLR(opt, step_size=3)
    assert opt.step.__wrapped__ is type(opt).step


def test_no_warnings_in_normal_use() -> None:
    opt = make_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = ours.SequentialLR(
            opt, [ours.LinearLR(opt, total_iters=3), ours.CosineAnnealingLR(opt, T_max=10)], milestones=[3]
        )
        for _ in range(20):
            opt.step()
            scheduler.step()


@pytest.mark.parametrize("name, kwargs", [("StepLR", {"step_size": 3}), ("CyclicLR", {"base_lr": 0.01, "max_lr": 0.1}),
                                          ("CosineAnnealingWarmRestarts", {"T_0": 3})])
def test_get_lr_outside_step_warns_like_torch(name: str, kwargs: dict) -> None:
    messages = [_warnings_of(getattr(lib, name)(make_optimizer(), **kwargs).get_lr) for lib in (ours, theirs)]
    assert len(messages[0]) == len(messages[1]) == 1
    assert "get_last_lr()" in messages[0][0]


def test_module_exports_torch_names() -> None:
    expected = {
        "LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
        "ExponentialLR", "PolynomialLR", "CosineAnnealingLR", "ChainedScheduler", "SequentialLR",
        "ReduceLROnPlateau", "CyclicLR", "OneCycleLR", "CosineAnnealingWarmRestarts",
    }
    assert set(ours.__all__) == expected
    assert all(issubclass(getattr(ours, name), ours.LRScheduler) for name in expected)


def test_constructor_signatures_match_torch() -> None:
    for name in ours.__all__:
        mine = inspect.signature(getattr(ours, name).__init__).parameters
        ref = inspect.signature(getattr(theirs, name).__init__).parameters
        assert [(p.name, p.default) for p in mine.values()] == [(p.name, p.default) for p in ref.values()], name



def _closed_form_lrs(scheduler: Any, epochs: range) -> list[list[float]]:
    """torch's closed form at each epoch, through the deprecated step(epoch)."""
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in epochs:
            scheduler.step(epoch)
            lrs.append([float(lr) for lr in scheduler.get_last_lr()])
    return lrs


@pytest.mark.parametrize("kwargs", [{"factor": 0.0, "total_iters": 3}, {"factor": 0.5, "total_iters": 0}], ids=str)
def test_constant_lr_follows_the_closed_form_where_torch_recursion_breaks(kwargs: dict) -> None:
    """factor=0: torch's recursive step divides by zero at total_iters; total_iters=0: it scales
    by factor for ever while its closed form never scales. Ours steps along the closed form."""
    opt = make_optimizer()
    scheduler = ours.ConstantLR(opt, **kwargs)
    stepped = [[float(lr) for lr in scheduler.get_last_lr()]]
    for _ in range(5):
        opt.step()
        scheduler.step()
        stepped.append([float(lr) for lr in scheduler.get_last_lr()])
    assert stepped == _closed_form_lrs(theirs.ConstantLR(make_optimizer(), **kwargs), range(6))
