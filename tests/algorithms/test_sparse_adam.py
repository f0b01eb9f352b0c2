"""SparseAdam against torch.optim.SparseAdam: embeddings with sparse gradients, state dicts, errors."""

from __future__ import annotations

import copy

import pytest
import torch

import shardoptim
from tests.oracle import assert_same_trajectory, tolerance


class Model(torch.nn.Module):
    """Two sparse embeddings (one with a padding row) feeding a fixed readout; optionally a dense bias."""

    def __init__(self, dtype: torch.dtype, *, bias: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.words = torch.nn.Embedding(40, 6, sparse=True, padding_idx=0, dtype=dtype)
        self.tags = torch.nn.Embedding(9, 6, sparse=True, dtype=dtype)
        for embedding in (self.words, self.tags):
            embedding.weight.data.copy_(torch.randn(embedding.weight.shape, generator=gen, dtype=dtype))
        self.readout = torch.randn(6, generator=gen, dtype=dtype)
        self.bias = torch.nn.Parameter(torch.zeros((), dtype=dtype)) if bias else None

    def forward(self, words: torch.Tensor, tags: torch.Tensor | None) -> torch.Tensor:
        hidden = self.words(words).sum(1)
        if tags is not None:
            hidden = hidden + self.tags(tags).sum(1)
        out = hidden @ self.readout
        return out + self.bias if self.bias is not None else out


def run_both(kwargs, *, dtype=torch.float32, steps=25, groups=False, between=None, seed=1):
    """Train ours and torch's on the same batches; every fourth step the tags are unused (no gradient)."""
    models = [Model(dtype), Model(dtype)]
    opts = []
    for cls, model in zip((shardoptim.SparseAdam, torch.optim.SparseAdam), models):
        params = (
            [{"params": [model.words.weight]}, {"params": [model.tags.weight], "lr": 0.03, "betas": (0.5, 0.9)}]
            if groups
            else list(model.parameters())
        )
        opts.append(cls(params, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        # Repeated indices within a batch: the optimizer must sum them before its non-linear update.
        words = torch.randint(0, 40, (8, 5), generator=gen)
        tags = torch.randint(0, 9, (8, 2), generator=gen) if step % 4 else None
        target = torch.randn(8, generator=gen, dtype=dtype)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            (model(words, tags) - target).square().mean().backward()
            opt.step()
        if between is not None:
            between(step, *opts)
    return [list(m.parameters()) for m in models], opts


def assert_same_state(ours: dict, theirs: dict, dtype: torch.dtype) -> None:
    assert ours.keys() == theirs.keys()
    for index, entry in theirs.items():
        assert ours[index].keys() == entry.keys()
        assert type(ours[index]["step"]) is int and ours[index]["step"] == entry["step"]
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[index][name], entry[name], **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(lr=0.02, maximize=True), dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)],
    ids=["defaults", "maximize", "options"],
)
def test_matches_torch(kwargs, dtype):
    (ours, theirs), (our_opt, their_opt) = run_both(kwargs, dtype=dtype)
    assert_same_trajectory(ours, theirs, dtype)
    assert_same_state(our_opt.state_dict()["state"], their_opt.state_dict()["state"], dtype)
    assert our_opt.state_dict()["param_groups"] == their_opt.state_dict()["param_groups"]
    assert our_opt.state[ours[1]]["step"] < our_opt.state[ours[0]]["step"], "unused tags skip steps"


def test_moves_only_the_rows_it_sees():
    model = Model(torch.float32)
    before = model.words.weight.detach().clone()
    opt = shardoptim.SparseAdam(model.parameters(), lr=0.1)
    model(torch.tensor([[3, 3, 5]]), None).sum().backward()
    opt.step()
    moved = (model.words.weight != before).any(1).nonzero().flatten().tolist()
    assert moved == [3, 5]
    assert opt.state[model.words.weight]["exp_avg"][[0, 4]].eq(0).all()
    assert opt.buckets == (), "no flat buckets: parameters stay where they are"


def test_param_groups_and_changed_hyper_parameters():
    def schedule(step, *opts):
        for opt in opts:
            opt.param_groups[0]["lr"] *= 0.9
            opt.param_groups[1]["betas"] = (0.6, 0.99)

    (ours, theirs), (our_opt, their_opt) = run_both(dict(lr=0.02), groups=True, between=schedule)
    assert_same_trajectory(ours, theirs, torch.float32)
    assert_same_state(our_opt.state_dict()["state"], their_opt.state_dict()["state"], torch.float32)


@pytest.mark.parametrize("lr", [torch.tensor(0.01), torch.tensor([0.01])], ids=["0-d", "1-d"])
def test_tensor_learning_rate_is_used_as_torch_uses_it(lr):
    """The step size is computed with the tensor, as torch does: the trajectories are bit for bit equal."""
    (ours, theirs), _ = run_both(dict(lr=lr))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_multi_dimensional_sparse_indices_and_empty_gradients():
    """A gradient sparse in both dimensions of a matrix, and one with no entries (a step, no update)."""
    results = []
    for cls in (shardoptim.SparseAdam, torch.optim.SparseAdam):
        param = torch.nn.Parameter(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)))
        opt = cls([param], lr=0.1)
        gen = torch.Generator().manual_seed(2)
        for step in range(6):
            if step == 3:
                param.grad = torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (5, 4))
            else:
                indices = torch.stack([torch.randint(0, n, (7,), generator=gen) for n in (5, 4)])
                param.grad = torch.sparse_coo_tensor(indices, torch.randn(7, generator=gen), (5, 4))
            opt.step()
        results.append((param, opt.state_dict()["state"]))
    (ours, our_state), (theirs, their_state) = results
    torch.testing.assert_close(ours, theirs)
    assert_same_state(our_state, their_state, torch.float32)


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch", "ours->ours"])
def test_state_dict_round_trip_then_continue(direction):
    """Ten steps in one optimizer, ten more in a fresh one loaded from its state dict."""
    make = {"ours": shardoptim.SparseAdam, "torch": torch.optim.SparseAdam}
    source, target = direction.split("->")
    model, reference = Model(torch.float32), Model(torch.float32)
    opt = make[source](model.parameters(), lr=0.02)
    reference_opt = torch.optim.SparseAdam(reference.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(4)
    for step in range(20):
        if step == 10:
            saved = copy.deepcopy(opt.state_dict())
            model = copy.deepcopy(model)
            opt = make[target](model.parameters(), lr=0.02)
            opt.load_state_dict(saved)
        words, tags = torch.randint(0, 40, (8, 5), generator=gen), torch.randint(0, 9, (8, 2), generator=gen)
        target_values = torch.randn(8, generator=gen)
        for m, o in ((model, opt), (reference, reference_opt)):
            o.zero_grad()
            (m(words, tags) - target_values).square().mean().backward()
            o.step()
    assert_same_trajectory(list(model.parameters()), list(reference.parameters()), torch.float32)
    assert_same_state(opt.state_dict()["state"], reference_opt.state_dict()["state"], torch.float32)


def test_closure_is_called_and_its_loss_returned():
    model = Model(torch.float32)
    opt = shardoptim.SparseAdam(model.parameters())

    def closure():
        opt.zero_grad()
        loss = model(torch.tensor([[1, 2]]), torch.tensor([[3]])).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.state[model.words.weight]["step"] == 1


# -- errors -------------------------------------------------------------------------------------


def _raises_like_torch(make, exception):
    with pytest.raises(exception) as theirs:
        make(torch.optim.SparseAdam)
    with pytest.raises(exception) as ours:
        make(shardoptim.SparseAdam)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0.0), dict(lr=-1e-3), dict(lr=torch.tensor([0.1, 0.2])), dict(eps=0.0), dict(betas=(1.0, 0.9)),
     dict(betas=(0.9, -0.1))],
    ids=["zero-lr", "negative-lr", "two-element-lr", "zero-eps", "beta1", "beta2"],
)
def test_invalid_hyper_parameters_raise_like_torch(kwargs):
    _raises_like_torch(lambda cls: cls(Model(torch.float32).parameters(), **kwargs), ValueError)


def test_invalid_group_override_raises_the_constructor_error():
    model = Model(torch.float32)
    opt = shardoptim.SparseAdam([model.words.weight])
    with pytest.raises(ValueError, match="^Invalid learning rate: 0$"):
        opt.add_param_group({"params": [model.tags.weight], "lr": 0})
    assert len(opt.param_groups) == 1


def test_sparse_and_complex_parameters_raise_like_torch():
    sparse = torch.nn.Parameter(torch.eye(3).to_sparse())
    dense = torch.nn.Parameter(torch.ones(2))
    _raises_like_torch(lambda cls: cls([dense, sparse]), ValueError)
    complex_ = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    _raises_like_torch(lambda cls: cls([{"params": [dense]}, {"params": [complex_]}]), ValueError)


def test_dense_gradient_raises_like_torch_and_changes_nothing():
    """A dense bias next to the embeddings: torch's error; ours raises before anything moves."""

    def make(cls):
        model = Model(torch.float32, bias=True)
        opt = cls([model.words.weight, model.tags.weight, model.bias])  # the dense one last
        model(torch.tensor([[1, 2]]), torch.tensor([[3]])).sum().backward()
        make.model, make.before = model, [p.detach().clone() for p in model.parameters()]
        make.opt = opt
        opt.step()

    _raises_like_torch(make, RuntimeError)
    assert all(torch.equal(p, b) for p, b in zip(make.model.parameters(), make.before))
    assert len(make.opt.state) == 0


def test_invalid_loaded_hyper_parameters_change_nothing():
    _, (opt, _) = run_both(dict(lr=0.01), steps=3)
    before = copy.deepcopy(opt.state_dict())
    saved = copy.deepcopy(before)
    saved["param_groups"][0]["eps"] = 0.0
    with pytest.raises(ValueError, match="^Invalid epsilon value: 0.0$"):
        opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"] == before["param_groups"]
    assert_same_state(opt.state_dict()["state"], before["state"], torch.float32)
