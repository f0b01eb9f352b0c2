"""What real training code does beyond the happy path, each checked against torch.optim doing the same."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import shardoptim


def twins(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    return module, copy.deepcopy(module)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randint(0, 20, (4, 5), generator=gen), torch.randint(0, 3, (4,), generator=gen)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        tokens, labels = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        opt.step()


def assert_same(a: nn.Module, b: nn.Module, **tolerance: float) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "NAdam"])
def test_fine_tuning_with_a_frozen_encoder(name):
    torch.manual_seed(0)
    ours_model, torch_model = twins(Encoder())
    for model in (ours_model, torch_model):
        model.encoder.requires_grad_(False)
    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    ours = getattr(shardoptim, name)(ours_model.parameters(), **kwargs)
    theirs = getattr(torch.optim, name)(torch_model.parameters(), **kwargs)
    frozen = [b for b in ours.buckets if not b.layout.trainable]
    assert frozen, "the frozen parameters have a bucket of their own"
    train(ours_model, ours, range(5))
    train(torch_model, theirs, range(5))
    assert_same(ours_model, torch_model)
    assert all(not b.state.tensors for b in frozen), "no state for parameters that never get a gradient"
    # unfreezing later, as gradual fine-tuning does
    for model in (ours_model, torch_model):
        model.encoder.requires_grad_(True)
    train(ours_model, ours, range(5, 10))
    train(torch_model, theirs, range(5, 10))
    assert_same(ours_model, torch_model)


def test_tensor_without_requires_grad_is_updated_when_given_a_grad_by_hand():
    results = []
    for module in (torch, shardoptim):
        p = torch.tensor([1.0, 2.0])
        opt = (torch.optim if module is torch else shardoptim).Adam([p], lr=0.1)
        opt.step()  # no gradient: nothing moves
        p.grad = torch.tensor([1.0, -1.0])
        opt.step()
        results.append(p.clone())
    torch.testing.assert_close(results[0], results[1])


def test_tied_weights_train_like_torch():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(tokens)).mean(1)[:, :3]

    torch.manual_seed(0)
    ours_model, torch_model = twins(Tied())
    assert torch_model.head.weight is torch_model.embed.weight
    ours, theirs = shardoptim.AdamW(ours_model.parameters(), lr=0.01), torch.optim.AdamW(torch_model.parameters(), lr=0.01)
    train(ours_model, ours, range(5))
    train(torch_model, theirs, range(5))
    assert ours_model.head.weight is ours_model.embed.weight
    assert_same(ours_model, torch_model)


@pytest.mark.parametrize("kwargs", [
    {"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "maximize": True},
], ids=["plain", "momentum", "dampening-maximize"])  # torch's sparse SGD takes neither nesterov nor weight decay
def test_sparse_embeddings_with_sgd(kwargs):
    _sparse_parity("SGD", kwargs)


@pytest.mark.parametrize("kwargs", [{"lr": 0.1}, {"lr": 0.1, "lr_decay": 0.01, "maximize": True}])
def test_sparse_embeddings_with_adagrad(kwargs):
    _sparse_parity("Adagrad", kwargs)


def _sparse_parity(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    ours_model, torch_model = twins(nn.Sequential(nn.EmbeddingBag(30, 4, sparse=True), nn.Linear(4, 2)))
    ours = getattr(shardoptim, name)(ours_model.parameters(), **kwargs)
    theirs = getattr(torch.optim, name)(torch_model.parameters(), **kwargs)
    for step in range(6):
        tokens = torch.randint(0, 30, (5, 3), generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad()
            model(tokens).pow(2).sum().backward()
            assert model[0].weight.grad.is_sparse
            opt.step()
    assert_same(ours_model, torch_model)
    for (i, entry), theirs_entry in zip(ours.state_dict()["state"].items(), theirs.state_dict()["state"].values()):
        for key, value in theirs_entry.items():
            expected = value.to_dense() if value.is_sparse else value
            torch.testing.assert_close(entry[key], expected, msg=f"state {i} {key}")


def test_adam_refuses_sparse_gradients_as_torch_does():
    for module in (torch.optim, shardoptim):
        embed = nn.Embedding(5, 2, sparse=True)
        opt = module.Adam(embed.parameters())
        embed(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
            opt.step()


@pytest.mark.parametrize("name, kwargs", [("SGD", {"momentum": 0.9}), ("Adam", {}), ("AdamW", {"weight_decay": 0.1})])
def test_meta_learning_gradient_through_a_differentiable_step(name, kwargs):
    """d loss(after one step) / d lr, and / d the initial weights: the step is part of the graph."""
    results = []
    for module in (torch.optim, shardoptim):
        torch.manual_seed(0)
        w0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
        w = w0.clone()
        opt = getattr(module, name)([w], lr=lr, differentiable=True, **kwargs)
        (grad,) = torch.autograd.grad(((x @ w - y) ** 2).mean(), w, create_graph=True)
        w.grad = grad
        opt.step()
        meta_loss = ((x @ w - y) ** 2).mean()
        lr_grad, w0_grad = torch.autograd.grad(meta_loss, [lr, w0])
        results.append((w.detach(), lr_grad, w0_grad))
    # torch's differentiable Adam takes its bias corrections from the float32 step tensor, ours in
    # float64; Adam's first-step gradient w.r.t. g nearly cancels (it is eps / (|g| + eps)^2), which
    # turns that rounding into ~1e-5 relative in d/dw0.
    for theirs, ours in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("conversion", ["double", "half", "bfloat16", "vector_to_parameters"])
def test_conversion_before_the_first_step_trains_like_torch(conversion):
    torch.manual_seed(0)
    ours_model, torch_model = twins(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    ours = shardoptim.SGD(ours_model.parameters(), lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9)
    for model in (ours_model, torch_model):
        if conversion == "vector_to_parameters":
            vector = nn.utils.parameters_to_vector(model.parameters()) * 0.5
            nn.utils.vector_to_parameters(vector, model.parameters())
        else:
            getattr(model, conversion)()
    dtype = next(torch_model.parameters()).dtype
    for step in range(3):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step)).to(dtype)
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad()
            model(x).float().pow(2).sum().backward()
            opt.step()
    assert all(p.dtype == dtype for p in ours_model.parameters())
    # torch's for-loop and our foreach kernels round half precision at different points.
    reduced = dtype in (torch.float16, torch.bfloat16)
    assert_same(ours_model, torch_model, **({"rtol": 2e-2, "atol": 1e-2} if reduced else {}))
    assert all(b.holds_param(i) for b in ours.buckets for i in range(len(b.params))), "back in the buckets"


def test_vector_to_parameters_after_steps_keeps_training():
    """torch.optim keeps the same Parameter objects and trains on; so do we (the values are taken in)."""
    torch.manual_seed(0)
    ours_model, torch_model = twins(nn.Linear(4, 2))
    ours, theirs = shardoptim.Adam(ours_model.parameters(), lr=0.1), torch.optim.Adam(torch_model.parameters(), lr=0.1)
    for step in range(4):
        if step == 2:
            for model in (ours_model, torch_model):
                nn.utils.vector_to_parameters(torch.zeros(10), model.parameters())
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad()
            model(torch.ones(3, 4) * step).sum().backward()
            opt.step()
    assert_same(ours_model, torch_model)


def test_conversion_after_state_exists_raises_naming_the_parameter():
    model = nn.Sequential(nn.Linear(4, 2))
    opt = shardoptim.Adam(model.named_parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    model.double()
    model(torch.ones(1, 4, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"'0\.weight' changed from torch.float32"):
        opt.step()
    reference = nn.Sequential(nn.Linear(4, 2))
    torch_opt = torch.optim.Adam(reference.parameters())
    reference(torch.ones(1, 4)).sum().backward()
    torch_opt.step()
    reference.double()
    reference(torch.ones(1, 4, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError):  # torch fails too, on the mismatched state
        torch_opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["AdamW", "NAdam", "SGD", "Adagrad"])
def test_copies_of_the_optimizer_step_like_torch_copies(how, name):
    def copied(thing):
        return copy.deepcopy(thing) if how == "deepcopy" else pickle.loads(pickle.dumps(thing))

    torch.manual_seed(0)
    start = nn.Linear(4, 2)
    finals = []
    for module in (torch.optim, shardoptim):
        model = copy.deepcopy(start)
        opt = getattr(module, name)(model.parameters(), lr=0.05)
        opt.step(_closure(model, opt))
        model_copy, opt_copy = copied((model, opt))
        assert opt_copy.param_groups[0]["params"][0] is model_copy.weight
        for _ in range(2):
            opt_copy.step(_closure(model_copy, opt_copy))
        opt.step(_closure(model, opt))  # the original goes on by itself
        finals.append((model_copy, model))
        if module is shardoptim:
            assert opt_copy.reduce_grads is True
            assert set(vars(opt)) - {"step"} <= set(vars(opt_copy)), "every public attribute is copied"
    (theirs_copy, theirs), (ours_copy, ours) = finals
    assert_same(ours_copy, theirs_copy)
    assert_same(ours, theirs)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_lbfgs_continues_as_the_original(how):
    """(torch's own LBFGS cannot step after a copy: it loses ``_params``.)"""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = shardoptim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    opt.step(_closure(model, opt))
    model_copy, opt_copy = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    for m, o in ((model, opt), (model_copy, opt_copy)):
        o.step(_closure(m, o))
    assert_same(model_copy, model, rtol=0, atol=0)


def _closure(model, opt):
    def closure():
        opt.zero_grad()
        loss = model(torch.ones(3, 4)).pow(2).sum()
        loss.backward()
        return loss

    return closure


def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    ours_model, torch_model = twins(nn.Linear(4, 3))
    ours, theirs = shardoptim.AdamW(ours_model.parameters(), lr=0.01), torch.optim.AdamW(torch_model.parameters(), lr=0.01)
    compiled_step = torch.compile(ours.step)
    for step in range(3):
        for model, run in ((ours_model, compiled_step), (torch_model, theirs.step)):
            model(torch.full((2, 4), float(step))).sum().backward()
            run()
            model.zero_grad()
    assert_same(ours_model, torch_model)
    copy.copy(ours.param_groups)  # groups and their views copy as torch's do


@pytest.mark.parametrize("name", ["AdamW", "NAdam", "ASGD", "Rprop"])
def test_load_own_state_dict_keeps_the_state(name):
    torch.manual_seed(0)
    ours_model, torch_model = twins(Encoder())
    ours = getattr(shardoptim, name)(ours_model.parameters(), lr=0.01)
    theirs = getattr(torch.optim, name)(torch_model.parameters(), lr=0.01)
    train(ours_model, ours, range(3))
    train(torch_model, theirs, range(3))
    ours.load_state_dict(ours.state_dict())
    theirs.load_state_dict(theirs.state_dict())
    train(ours_model, ours, range(3, 6))
    train(torch_model, theirs, range(3, 6))
    assert_same(ours_model, torch_model)


def test_dcp_get_load_set_keeps_the_state(tmp_path):
    """DCP's documented optimizer pattern: get_optimizer_state_dict -> dcp.save/dcp.load -> set."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    ours_model, torch_model = twins(Encoder())
    ours = shardoptim.AdamW(ours_model.parameters(), lr=0.01)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=0.01)
    train(ours_model, ours, range(3))
    train(torch_model, theirs, range(3))
    for name, model, opt in (("ours", ours_model, ours), ("torch", torch_model, theirs)):
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / name))
        state = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(tmp_path / name))
        set_optimizer_state_dict(model, opt, state["optim"])
    assert int(ours.state[ours_model.head.weight]["step"]) == 3
    train(ours_model, ours, range(3, 6))
    train(torch_model, theirs, range(3, 6))
    assert_same(ours_model, torch_model)


def test_grad_scaler_skips_the_step_with_an_injected_inf():
    torch.manual_seed(0)
    ours_model, torch_model = twins(nn.Linear(4, 2))
    runs = []
    for model, opt in ((ours_model, shardoptim.SGD(ours_model.parameters(), lr=0.1, momentum=0.9)),
                       (torch_model, torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9))):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scales = []
        for step in range(4):
            opt.zero_grad()
            scaler.scale(model(torch.ones(3, 4)).sum()).backward()
            if step == 1:
                model.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
            if step == 1:
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "skipped step"
        runs.append(scales)
    assert runs[0] == runs[1]
    assert_same(ours_model, torch_model)


def test_subpackages_are_reachable_after_import_shardoptim():
    import importlib

    module = importlib.reload(shardoptim)
    opt = module.SGD([nn.Parameter(torch.ones(2))], lr=1.0)
    assert isinstance(module.sched.StepLR(opt, 2), torch.optim.lr_scheduler.LRScheduler)
    assert module.ema.AveragedModel and module.checkpoint


def test_safetensors_saves_and_loads_the_model(tmp_path):
    from safetensors.torch import load_model, save_model

    torch.manual_seed(0)
    model = Encoder()
    opt = shardoptim.AdamW(model.parameters(), lr=0.01)
    train(model, opt, range(2))
    save_model(model, str(tmp_path / "model.safetensors"))
    restored = Encoder()
    missing, unexpected = load_model(restored, str(tmp_path / "model.safetensors"))
    assert not missing and not unexpected
    assert_same(restored, model, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model.head.weight, buffer)
    assert len(buffer.getvalue()) < 4 * model.head.weight.numel() + 2048, "torch.save writes one parameter, not the bucket"


def test_step_does_not_write_into_grad_tensors():
    model = nn.Linear(4, 2)
    opt = shardoptim.AdamW(model.parameters(), maximize=True)
    model(torch.ones(3, 4)).sum().backward()
    versions = [p.grad._version for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert [p.grad._version for p in model.parameters()] == versions
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_step_bumps_parameter_versions_as_torch_does():
    """A graph that saved a weight before step() fails its backward, as with torch.optim."""
    for module in (torch.optim, shardoptim):
        model = nn.Linear(4, 2)
        opt = module.SGD(model.parameters(), lr=0.1)
        model(torch.ones(3, 4)).sum().backward()
        stale = (model(torch.ones(3, 4, requires_grad=True)) ** 2).sum()  # saves the weight for d/dx
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            stale.backward()


def test_a_parameter_listed_twice_is_updated_twice_as_in_torch():
    results = []
    for module in (torch.optim, shardoptim):
        p = nn.Parameter(torch.tensor([1.0, -2.0]))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = module.Adam([p, p], lr=0.1)
        for _ in range(3):
            p.grad = torch.tensor([0.5, 0.25])
            opt.step()
        results.append((p.detach().clone(), opt.state_dict()))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[1][1]["param_groups"][0]["params"] == results[0][1]["param_groups"][0]["params"]


def test_a_parameter_listed_twice_is_still_updated_twice_after_a_conversion():
    results = []
    for module in (torch.optim, shardoptim):
        a, b = nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([3.0]))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = module.SGD([a, b, a], lr=0.1)
        for p in (a, b):  # what model.double() does, before the first step (the buckets are packed anew)
            p.data = p.data.double()
        for _ in range(2):
            a.grad, b.grad = torch.ones(2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
            opt.step()
        results.append((a.detach().clone(), b.detach().clone()))
    torch.testing.assert_close(results[1], results[0])


def test_sparse_adam_clip_grad_norm_clips():
    embed_ours, embed_torch = twins(nn.Embedding(10, 3, sparse=True))
    ours = shardoptim.SparseAdam(embed_ours.parameters())
    rows = torch.tensor([1, 4, 4, 7])
    for model in (embed_ours, embed_torch):
        (model(rows) * 10).sum().backward()
    total = ours.clip_grad_norm_(0.5)
    expected = embed_torch.weight.grad.coalesce().values().norm()
    assert expected.item() > 0.5
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(embed_ours.weight.grad.coalesce().values().norm(), torch.tensor(0.5), rtol=1e-5, atol=1e-5)


def test_nadam_in_float64_follows_torch_scalar_arithmetic():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        ours_model, torch_model = twins(nn.Linear(5, 3))
        ours = shardoptim.NAdam(ours_model.parameters(), lr=0.01, foreach=False)
        theirs = torch.optim.NAdam(torch_model.parameters(), lr=0.01, foreach=False)
        for step in range(30):
            for model, opt in ((ours_model, ours), (torch_model, theirs)):
                opt.zero_grad()
                model(torch.full((2, 5), step / 10.0)).pow(2).sum().backward()
                opt.step()
        # torch's for-loop divides by the bias correction before the square root, ours after (as its
        # foreach does): a last-bit difference, not the 1e-11 a float32-vs-float64 mu_product made.
        assert_same(ours_model, torch_model, rtol=1e-12, atol=0)
        for a, b in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
            assert a["mu_product"].dtype == b["mu_product"].dtype == torch.float64
            assert a["mu_product"].item() == b["mu_product"].item()
    finally:
        torch.set_default_dtype(torch.float32)
