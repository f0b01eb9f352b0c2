"""update_bn against torch.optim.swa_utils.update_bn."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.optim.swa_utils as theirs
from torch import nn

import shardoptim.ema as ours

from .models import bn_net, mlp, train_step


def _trained_bn_net() -> nn.Module:
    model = bn_net(0)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        train_step(model, gen)
    return model


def _batches(kind: str, count: int = 4) -> list:
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(5 + i, 2, 6, 6, generator=gen) for i in range(count)]
    if kind == "tensors":
        return inputs
    if kind == "tuples":
        return [(x, torch.zeros(len(x))) for x in inputs]
    return [[x, "label"] for x in inputs]


@pytest.mark.parametrize("kind", ["tensors", "tuples", "lists"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_statistics_match_torch(kind, training):
    mine, reference = _trained_bn_net(), _trained_bn_net()
    mine.train(training)
    reference.train(training)
    ours.update_bn(_batches(kind), mine)
    theirs.update_bn(_batches(kind), reference)
    for (name, a), b in zip(mine.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert mine.training is training
    assert all(module.training is training for module in mine.modules())


def test_device_argument_moves_inputs():
    mine, reference = _trained_bn_net(), _trained_bn_net()
    ours.update_bn(_batches("tensors"), mine, device="cpu")
    theirs.update_bn(_batches("tensors"), reference, device=torch.device("cpu"))
    for a, b in zip(mine.buffers(), reference.buffers()):
        assert torch.equal(a, b)


def test_momentum_restored_and_statistics_are_a_plain_average():
    model = nn.Sequential(nn.BatchNorm1d(3, momentum=0.3))
    batches = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ours.update_bn(batches, model)
    assert model[0].momentum == 0.3
    expected = torch.stack([b.mean(0) for b in batches]).mean(0)
    torch.testing.assert_close(model[0].running_mean, expected)
    assert int(model[0].num_batches_tracked) == 3


def test_averaged_model_input():
    model = _trained_bn_net()
    mine = ours.AveragedModel(model)
    reference = theirs.AveragedModel(model)
    ours.update_bn(_batches("tensors"), mine)
    theirs.update_bn(_batches("tensors"), reference)
    for a, b in zip(mine.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_model_without_batchnorm_is_untouched():
    model = mlp(0)
    before = copy.deepcopy(model.state_dict())
    model.eval()

    def loader():
        raise AssertionError("the loader must not be read")
        yield  # pragma: no cover

    ours.update_bn(loader(), model)
    assert not model.training
    for a, b in zip(model.state_dict().values(), before.values()):
        assert torch.equal(a, b)


def test_no_gradients_recorded():
    model = _trained_bn_net()
    model.zero_grad(set_to_none=True)
    ours.update_bn(_batches("tensors"), model)
    assert all(p.grad is None for p in model.parameters())
