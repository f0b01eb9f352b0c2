"""AveragedModel against torch.optim.swa_utils.AveragedModel, updated side by side from one model."""

from __future__ import annotations

import pytest
import torch
import torch.optim.swa_utils as theirs
from torch import nn

import shardoptim.ema as ours

from .models import bn_net, mixed_dtype_net, mlp, train_step


def _custom_avg_fn(averaged, current, num_averaged):
    return averaged * 0.5 + current * 0.5 + num_averaged * 1e-3


def _custom_multi_avg_fn(averaged, current, num_averaged):
    for a, c in zip(averaged, current):
        a.mul_(0.25).add_(c, alpha=0.75)


def _rules(module):
    """(name, kwargs builder): each builder takes the swa_utils-like module and returns fresh kwargs."""
    return {
        "swa": {},
        "ema_multi": {"multi_avg_fn": module.get_ema_multi_avg_fn(0.9)},
        "ema_single": {"avg_fn": module.get_ema_avg_fn(0.9)},
        "swa_multi": {"multi_avg_fn": module.get_swa_multi_avg_fn()},
        "swa_single": {"avg_fn": module.get_swa_avg_fn()},
        "custom_single": {"avg_fn": _custom_avg_fn},
        "custom_multi": {"multi_avg_fn": _custom_multi_avg_fn},
    }


RULES = list(_rules(ours))
FACTORIES = {"mlp": mlp, "bn": bn_net, "mixed_dtype": mixed_dtype_net}


def _run_both(factory, rule: str, use_buffers: bool, updates: int = 6, **extra):
    model = factory(0)
    mine = ours.AveragedModel(model, use_buffers=use_buffers, **_rules(ours)[rule], **extra)
    reference = theirs.AveragedModel(model, use_buffers=use_buffers, **_rules(theirs)[rule], **extra)
    gen = torch.Generator().manual_seed(1)
    for _ in range(updates):
        train_step(model, gen)
        mine.update_parameters(model)
        reference.update_parameters(model)
    return model, mine, reference


def _assert_same_state(mine: nn.Module, reference: nn.Module) -> None:
    ours_state, theirs_state = mine.state_dict(), reference.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key, value in theirs_state.items():
        assert ours_state[key].dtype == value.dtype, key
        assert torch.equal(ours_state[key], value), key


#: Rules torch itself cannot apply to integer buffers (BatchNorm's num_batches_tracked).
FAILS_ON_INTEGER_BUFFERS = {"swa_multi", "custom_multi"}


@pytest.mark.parametrize("factory", list(FACTORIES), ids=str)
@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize("rule", RULES)
def test_average_matches_torch(factory, rule, use_buffers):
    if use_buffers and factory == "bn" and rule in FAILS_ON_INTEGER_BUFFERS:
        for module in (ours, theirs):
            model = bn_net(0)
            averaged = module.AveragedModel(model, use_buffers=True, **_rules(module)[rule])
            averaged.update_parameters(model)
            with pytest.raises(RuntimeError):
                averaged.update_parameters(model)
        return
    _, mine, reference = _run_both(FACTORIES[factory], rule, use_buffers)
    _assert_same_state(mine, reference)
    assert int(mine.n_averaged) == 6


def test_averages_differ_from_the_model():
    model, mine, _ = _run_both(mlp, "swa", False)
    assert not torch.equal(mine.module[0].weight, model[0].weight)


def test_first_update_copies_the_model():
    model = bn_net(0)
    mine = ours.AveragedModel(model, multi_avg_fn=ours.get_ema_multi_avg_fn(0.5), use_buffers=True)
    train_step(model, torch.Generator().manual_seed(0))
    mine.update_parameters(model)
    for a, b in zip(mine.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_buffers_follow_the_model_without_use_buffers():
    model, mine, _ = _run_both(bn_net, "ema_multi", False)
    for a, b in zip(mine.module.buffers(), model.buffers()):
        assert torch.equal(a, b)


def test_device_argument():
    model = mlp(0)
    mine = ours.AveragedModel(model, device="cpu")
    assert mine.n_averaged.device == torch.device("cpu")
    assert mine.n_averaged.dtype == torch.long


def test_the_copy_is_independent_of_the_model():
    model = mlp(0)
    mine = ours.AveragedModel(model)
    assert all(a is not b for a, b in zip(mine.parameters(), model.parameters()))
    with torch.no_grad():
        model[0].weight.add_(1)
    assert not torch.equal(mine.module[0].weight, model[0].weight)


def test_forward_runs_the_averaged_module():
    model, mine, reference = _run_both(bn_net, "swa", True)
    mine.eval()
    reference.eval()
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mine(x), reference(x))


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_loads_across(direction):
    _, mine, reference = _run_both(bn_net, "ema_multi", True)
    fresh_ours = ours.AveragedModel(bn_net(3), use_buffers=True)
    fresh_theirs = theirs.AveragedModel(bn_net(3), use_buffers=True)
    if direction == "torch_to_ours":
        fresh_ours.load_state_dict(reference.state_dict())
        _assert_same_state(fresh_ours, reference)
    else:
        fresh_theirs.load_state_dict(mine.state_dict())
        _assert_same_state(mine, fresh_theirs)


def test_resumed_average_continues_like_torch():
    model, mine, reference = _run_both(mlp, "swa", False, updates=3)
    resumed = ours.AveragedModel(mlp(7))
    resumed.load_state_dict(reference.state_dict())
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        train_step(model, gen)
        resumed.update_parameters(model)
        reference.update_parameters(model)
    _assert_same_state(resumed, reference)


def test_both_averaging_functions_raise_like_torch():
    kwargs = {"avg_fn": ours.get_swa_avg_fn(), "multi_avg_fn": ours.get_swa_multi_avg_fn()}
    with pytest.raises(AssertionError):
        theirs.AveragedModel(mlp(0), **kwargs)
    with pytest.raises(AssertionError, match="Only one of avg_fn and multi_avg_fn"):
        ours.AveragedModel(mlp(0), **kwargs)


def test_mismatched_buffers_raise_like_torch():
    with_bn, without_bn = bn_net(0), nn.Sequential(nn.Conv2d(2, 4, 3))
    with pytest.raises(ValueError):
        theirs.AveragedModel(with_bn).update_parameters(without_bn)
    with pytest.raises(ValueError):
        ours.AveragedModel(with_bn).update_parameters(without_bn)


def test_update_does_not_record_autograd():
    model = mlp(0)
    mine = ours.AveragedModel(model, avg_fn=_custom_avg_fn)
    mine.update_parameters(model)
    mine.update_parameters(model)
    assert all(p.grad_fn is None for p in mine.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", ["swa", "ema_multi"])
def test_cuda_average_matches_torch(rule):
    _, mine, reference = _run_both(mlp, rule, False, device="cuda")
    _assert_same_state(mine, reference)
