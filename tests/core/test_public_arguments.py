"""Bad input to the public API beyond the optimizers' hyper-parameters (those are
tests/algorithms/test_validation_properties.py): ShardingConfig, the optimizer's own keywords, the
parameter list, state dicts of another algorithm, the EMA and the checkpoint API. Each is refused with
the exception type torch uses where torch has the case, naming the argument and the value, before
anything is written or changed."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import shardoptim
from shardoptim import checkpoint


@pytest.mark.parametrize("field, value, error", [
    ("bucket_cap_numel", 0, ValueError), ("bucket_cap_numel", -5, ValueError), ("bucket_cap_numel", 2.5, ValueError),
    ("bucket_cap_numel", True, ValueError), ("average", "sum", ValueError), ("gather", "scatter", ValueError),
    ("shard_grads", 1, TypeError), ("overlap_grad_reduce", "yes", TypeError),
    ("exchanges_in_flight", 0, ValueError), ("exchanges_in_flight", 1.5, ValueError),
    ("collective_timeout_s", 0, ValueError), ("collective_timeout_s", -1.0, ValueError),
    ("collective_timeout_s", math.nan, ValueError), ("collective_timeout_s", math.inf, ValueError),
    ("collective_timeout_s", "60", ValueError),
])
def test_sharding_config_refuses_bad_values_naming_them(field, value, error):
    with pytest.raises(error, match=field) as raised:
        shardoptim.ShardingConfig(**{field: value})
    assert repr(value) in str(raised.value) or str(value) in str(raised.value)


def test_sharding_config_refuses_unknown_and_positional_fields():
    with pytest.raises(TypeError, match="shard_grad"):
        shardoptim.ShardingConfig(shard_grad=True)  # a typo must not pass silently
    with pytest.raises(TypeError):
        shardoptim.ShardingConfig(1 << 20)


def test_optimizer_keywords_of_the_wrong_type_are_named():
    model = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="sharding must be a shardoptim.ShardingConfig, got dict"):
        shardoptim.AdamW(model.parameters(), sharding={"shard_grads": True})
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup.*got str"):
        shardoptim.AdamW(model.parameters(), process_group="world")


def _parameter_lists():
    model = nn.Linear(3, 3)
    return {
        "empty": lambda lib: lib.AdamW([]),
        "duplicated across groups": lambda lib: lib.AdamW([{"params": [model.weight]}, {"params": [model.weight]}]),
        "non-leaf": lambda lib: lib.AdamW([model.weight * 2]),
        "a bare tensor": lambda lib: lib.AdamW(model.weight),
        "a group without params": lambda lib: lib.AdamW([{"lr": 0.1}]),
        "a group of a set": lambda lib: lib.SGD([{"params": {model.weight}}], lr=0.1),
    }


@pytest.mark.parametrize("case", list(_parameter_lists()))
def test_bad_parameter_lists_fail_as_in_torch(case):
    build = _parameter_lists()[case]
    with pytest.raises(Exception) as torch_error:
        build(torch.optim)
    with pytest.raises(type(torch_error.value)) as ours:
        build(shardoptim)
    assert str(torch_error.value) in str(ours.value)


def test_a_state_dict_of_another_algorithm_is_refused_and_changes_nothing():
    model = nn.Linear(3, 3)
    sgd = shardoptim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = shardoptim.AdamW(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    sgd.step()
    adam.step()
    before = copy.deepcopy(adam.state_dict())
    with pytest.raises(ValueError, match="momentum_buffer"):
        adam.load_state_dict(sgd.state_dict())
    after = adam.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][index][name], value)


@pytest.mark.parametrize("decay", [-0.1, 1.5, math.nan])
def test_sharded_ema_refuses_a_bad_decay(decay):
    opt = shardoptim.AdamW(nn.Linear(3, 3).parameters())
    with pytest.raises(ValueError, match="decay"):
        shardoptim.ema.ShardedEMA(opt, decay=decay)


def test_sharded_ema_needs_a_shardoptim_optimizer():
    with pytest.raises(TypeError, match="shardoptim optimizer"):
        shardoptim.ema.ShardedEMA(torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1), decay=0.9)


def _live():
    model = nn.Linear(3, 3)
    return model, shardoptim.AdamW(model.parameters())


@pytest.mark.parametrize("arguments, error, names", [
    ({"step": -1}, ValueError, "step"), ({"step": 1.5}, ValueError, "step"), ({"step": True}, ValueError, "step"),
    ({"metric": math.nan}, ValueError, "metric"), ({"metric": math.inf}, ValueError, "metric"),
    ({"metric": "0.1"}, ValueError, "metric"), ({"run": "x" * 201}, ValueError, "run"), ({"run": 7}, ValueError, "run"),
    ({"optimizer": "adamw"}, TypeError, "optimizer"), ({"model": {"weight": 1}}, TypeError, "model"),
    ({"schedulers": 3}, TypeError, "schedulers"), ({"schedulers": ["StepLR"]}, TypeError, r"schedulers\[0\]"),
    ({"ema": 0.99}, TypeError, "ema"), ({"storage_options": [("anon", True)]}, TypeError, "storage_options"),
    ({"extra": {"at": object()}}, TypeError, "not JSON data"),
])
def test_save_refuses_bad_arguments_before_writing_anything(tmp_path, arguments, error, names):
    model, opt = _live()
    url = tmp_path / "ckpt"
    with pytest.raises(error, match=names):
        checkpoint.save(str(url), **{"model": model, "optimizer": opt, **arguments})
    assert not url.exists() or not any(url.iterdir())


@pytest.mark.parametrize("arguments, error, names", [
    ({"optimizer": "adamw"}, TypeError, "optimizer"), ({"model": {"weight": 1}}, TypeError, "model"),
    ({"schedulers": 3}, TypeError, "schedulers"), ({"storage_options": "anon"}, TypeError, "storage_options"),
])
def test_load_refuses_bad_arguments(tmp_path, arguments, error, names):
    model, opt = _live()
    checkpoint.save(str(tmp_path / "ckpt"), model=model, optimizer=opt)
    with pytest.raises(error, match=names):
        checkpoint.load(str(tmp_path / "ckpt"), **{"model": model, "optimizer": opt, **arguments})


@pytest.mark.parametrize("arguments, names", [
    ({"keep_last": 0}, "keep_last"), ({"keep_best": -1}, "keep_best"), ({"keep_last": 2.0}, "keep_last"),
    ({"metric_mode": "best"}, "metric_mode"),
])
def test_checkpoint_manager_refuses_bad_settings(tmp_path, arguments, names):
    with pytest.raises(ValueError, match=names):
        checkpoint.CheckpointManager(str(tmp_path), **arguments)


def test_checkpoint_manager_refuses_a_bad_step(tmp_path):
    model, opt = _live()
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        checkpoint.CheckpointManager(str(tmp_path)).save(-1, model=model, optimizer=opt)
