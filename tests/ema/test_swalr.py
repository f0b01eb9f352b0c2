"""SWALR against torch.optim.swa_utils.SWALR: learning-rate sequences, state dicts, errors, warnings."""

from __future__ import annotations

import json
import math
import types
import warnings

import pytest
import torch
import torch.optim.swa_utils as theirs
from torch import nn

import shardoptim.ema as ours


def _optimizer(lrs=(0.1, 0.03), tensor_lr: bool = False) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    groups = [
        {"params": [nn.Parameter(torch.randn(3))], "lr": torch.tensor(lr) if tensor_lr else lr}
        for lr in lrs
    ]
    return torch.optim.SGD(groups, lr=0.5)


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


def _assert_close_lrs(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert math.isclose(float(x), float(y), rel_tol=1e-12, abs_tol=0.0), (a, b)


def _run(module, steps: int, *, lrs=(0.1, 0.03), tensor_lr=False, between=None, **kwargs):
    """Step an optimizer and its scheduler ``steps`` times; return the lr after every step."""
    optimizer = _optimizer(lrs, tensor_lr)
    scheduler = module.SWALR(optimizer, **kwargs)
    seen = [_lrs(optimizer)]
    for step in range(steps):
        optimizer.step()
        if between is not None:
            between(step, optimizer)
        scheduler.step()
        seen.append(_lrs(optimizer))
        _assert_close_lrs(scheduler.get_last_lr(), seen[-1])
    return seen, scheduler, optimizer


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 2, 5, 10])
@pytest.mark.parametrize("swa_lr", [0.05, [0.01, 0.2]], ids=["one", "per_group"])
def test_lr_sequence_matches_torch(strategy, anneal_epochs, swa_lr):
    kwargs = {"swa_lr": swa_lr, "anneal_epochs": anneal_epochs, "anneal_strategy": strategy}
    mine, _, _ = _run(ours, 15, **kwargs)
    reference, _, _ = _run(theirs, 15, **kwargs)
    assert mine == reference  # same arithmetic in the same order: bit for bit
    assert mine[-1] == ([0.05, 0.05] if swa_lr == 0.05 else swa_lr)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_lr_changed_by_someone_else_mid_anneal(strategy):
    def nudge(step, optimizer):
        if step == 2:
            optimizer.param_groups[0]["lr"] *= 3

    kwargs = {"swa_lr": 0.05, "anneal_epochs": 6, "anneal_strategy": strategy, "between": nudge}
    mine, _, _ = _run(ours, 10, **kwargs)
    reference, _, _ = _run(theirs, 10, **kwargs)
    for a, b in zip(mine, reference):
        _assert_close_lrs(a, b)


def test_tensor_learning_rates():
    mine, _, optimizer = _run(ours, 6, tensor_lr=True, swa_lr=0.05, anneal_epochs=4)
    reference, _, _ = _run(theirs, 6, tensor_lr=True, swa_lr=0.05, anneal_epochs=4)
    for a, b in zip(mine, reference):
        _assert_close_lrs(a, b)
    assert all(isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups)


def test_groups_get_swa_lr_and_initial_lr():
    optimizer = _optimizer()
    scheduler = ours.SWALR(optimizer, swa_lr=[0.01, 0.02], anneal_epochs=3)
    assert [group["swa_lr"] for group in optimizer.param_groups] == [0.01, 0.02]
    assert [group["initial_lr"] for group in optimizer.param_groups] == [0.1, 0.03]
    assert scheduler.base_lrs == [0.1, 0.03]
    assert scheduler.last_epoch == 0
    assert scheduler.anneal_strategy == "cos"


def test_resume_with_last_epoch_matches_torch():
    results = []
    for module in (ours, theirs):
        optimizer = _optimizer()
        for group in optimizer.param_groups:
            group["initial_lr"] = 1.0
        scheduler = module.SWALR(optimizer, swa_lr=0.05, anneal_epochs=4, last_epoch=6)
        seen = [_lrs(optimizer)]
        for _ in range(5):
            optimizer.step()
            scheduler.step()
            seen.append(_lrs(optimizer))
        results.append((seen, scheduler.last_epoch, scheduler.base_lrs))
    (mine, mine_epoch, mine_base), (reference, theirs_epoch, theirs_base) = results
    for a, b in zip(mine, reference):
        _assert_close_lrs(a, b)
    assert mine_epoch == theirs_epoch == 12
    assert mine_base == theirs_base == [1.0, 1.0]


def test_resume_without_initial_lr_raises_like_torch():
    with pytest.raises(KeyError):
        theirs.SWALR(_optimizer(), swa_lr=0.05, last_epoch=3)
    with pytest.raises(KeyError, match="initial_lr"):
        ours.SWALR(_optimizer(), swa_lr=0.05, last_epoch=3)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"swa_lr": 0.05, "anneal_strategy": "exp"}, ValueError, "anneal_strategy must be one of"),
        ({"swa_lr": 0.05, "anneal_epochs": -1}, ValueError, "anneal_epochs must be equal or greater than 0"),
        ({"swa_lr": 0.05, "anneal_epochs": 2.5}, ValueError, "anneal_epochs must be equal or greater than 0"),
        ({"swa_lr": [0.05, 0.1, 0.2]}, ValueError, "swa_lr must have the same length"),
    ],
)
def test_invalid_arguments_raise_like_torch(kwargs, error, message):
    with pytest.raises(error, match=message):
        theirs.SWALR(_optimizer(), **kwargs)
    optimizer = _optimizer()
    with pytest.raises(error, match=message):
        ours.SWALR(optimizer, **kwargs)
    assert all("swa_lr" not in group for group in optimizer.param_groups)


def test_not_an_optimizer_raises_type_error():
    with pytest.raises(TypeError, match="is not an Optimizer"):
        ours.SWALR(object(), swa_lr=0.05)


def test_state_dict_is_json_and_resumes_exactly():
    uninterrupted, _, _ = _run(ours, 8, swa_lr=0.05, anneal_epochs=6)
    first, scheduler, optimizer = _run(ours, 3, swa_lr=0.05, anneal_epochs=6)
    saved = json.loads(json.dumps(scheduler.state_dict()))
    resumed = ours.SWALR(optimizer, swa_lr=0.05, anneal_epochs=6)
    resumed.load_state_dict(saved)
    optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = first[-1]
    seen = first
    for _ in range(5):
        optimizer.step()
        resumed.step()
        seen.append(_lrs(optimizer))
    assert seen == uninterrupted


def test_state_dict_of_tensor_lrs_is_json():
    _, scheduler, _ = _run(ours, 3, tensor_lr=True, swa_lr=0.05)
    json.dumps(scheduler.state_dict())


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_loads_across(direction):
    _, mine, _ = _run(ours, 3, swa_lr=0.05, anneal_epochs=6, anneal_strategy="linear")
    _, reference, _ = _run(theirs, 3, swa_lr=0.05, anneal_epochs=6, anneal_strategy="linear")
    source, target_module = (reference, ours) if direction == "torch_to_ours" else (mine, theirs)
    optimizer = _optimizer()
    target = target_module.SWALR(optimizer, swa_lr=0.05, anneal_epochs=2, anneal_strategy="cos")
    target.load_state_dict(source.state_dict())
    for key in ("last_epoch", "anneal_epochs", "base_lrs", "_step_count", "_anneal_strategy"):
        assert getattr(target, key) == getattr(source, key), key
    _assert_close_lrs(target.get_last_lr(), source.get_last_lr())
    for group, lr in zip(optimizer.param_groups, source.get_last_lr()):
        group["lr"] = lr
    optimizer.step()
    target.step()
    source.optimizer.step()
    source.step()
    _assert_close_lrs(_lrs(optimizer), _lrs(source.optimizer))


def test_load_state_dict_checks_before_changing():
    _, scheduler, _ = _run(ours, 2, swa_lr=0.05)
    before = scheduler.state_dict()
    with pytest.raises(ValueError, match="anneal_strategy"):
        scheduler.load_state_dict({**before, "last_epoch": 40, "_anneal_strategy": "step"})
    with pytest.raises(ValueError, match="base_lrs"):
        scheduler.load_state_dict({**before, "last_epoch": 40, "base_lrs": [0.1]})
    assert scheduler.state_dict() == before


def _warnings_of(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("module", [ours, theirs], ids=["ours", "torch"])
def test_warnings(module):
    optimizer = _optimizer()
    scheduler = module.SWALR(optimizer, swa_lr=0.05)
    assert any("before `optimizer.step()`" in m for m in _warnings_of(scheduler.step))
    optimizer.step()
    assert _warnings_of(scheduler.step) == []
    assert any("get_last_lr()" in m for m in _warnings_of(scheduler.get_lr))
    assert any("epoch parameter" in m for m in _warnings_of(lambda: scheduler.step(7)))
    assert scheduler.last_epoch == 7


def test_no_warning_when_optimizer_steps_first():
    optimizer = _optimizer()
    scheduler = ours.SWALR(optimizer, swa_lr=0.05)
    optimizer.step()
    assert _warnings_of(scheduler.step) == []


def test_works_with_shardoptim_optimizers():
    import shardoptim

    torch.manual_seed(0)
    optimizer = shardoptim.SGD([nn.Parameter(torch.randn(4))], lr=0.2)
    scheduler = ours.SWALR(optimizer, swa_lr=0.02, anneal_epochs=3)
    optimizer.step()
    assert _warnings_of(scheduler.step) == []
    reference, _, _ = _run(theirs, 1, lrs=(0.2,), swa_lr=0.02, anneal_epochs=3)
    _assert_close_lrs(scheduler.get_last_lr(), reference[-1])


def test_is_a_torch_lr_scheduler() -> None:
    scheduler = ours.SWALR(_optimizer(), swa_lr=0.05)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    assert isinstance(theirs.SWALR(_optimizer(), swa_lr=0.05), torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("source_module", [ours, theirs], ids=["from_ours", "from_torch"])
@pytest.mark.parametrize("target_module", [ours, theirs], ids=["into_ours", "into_torch"])
def test_after_loading_every_attribute_but_the_optimizer_equals_the_source(source_module, target_module):
    _, source, _ = _run(source_module, 5, swa_lr=0.05, anneal_epochs=3)
    target = target_module.SWALR(_optimizer(), swa_lr=0.5, anneal_epochs=10, anneal_strategy="linear")
    target.load_state_dict(source.state_dict())
    loaded = {key: value for key, value in vars(target).items() if key not in ("optimizer", "anneal_func")}
    assert loaded == {key: getattr(source, key) for key in loaded}
    if source_module is target_module:
        assert set(loaded) == set(vars(source)) - {"optimizer", "anneal_func"}


def _caught(action) -> list[tuple[type, str, str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [(w.category, str(w.message), w.filename) for w in caught]


def _order_scenario(module, *, optimizer_first: bool, override: bool, epoch: int | None = None):
    optimizer = _optimizer()
    scheduler = module.SWALR(optimizer, swa_lr=0.05, anneal_epochs=3)
    if override:
        old_step = optimizer.step
        optimizer.step = types.MethodType(lambda self, *args, **kwargs: old_step(*args, **kwargs), optimizer)

    def run():
        for _ in range(3):
            if optimizer_first:
                optimizer.step()
            scheduler.step(epoch)
            if not optimizer_first:
                optimizer.step()

    return _caught(run)


@pytest.mark.parametrize("epoch", [None, 4])
@pytest.mark.parametrize("override", [False, True], ids=["step_kept", "step_overridden"])
@pytest.mark.parametrize("optimizer_first", [True, False], ids=["optimizer_first", "scheduler_first"])
def test_warnings_are_torchs(optimizer_first, override, epoch):
    kwargs = {"optimizer_first": optimizer_first, "override": override, "epoch": epoch}
    assert _order_scenario(ours, **kwargs) == _order_scenario(theirs, **kwargs)
