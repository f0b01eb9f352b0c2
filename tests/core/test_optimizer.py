"""The torch.optim.Optimizer contract of shardoptim.Optimizer, with torch.optim as the oracle."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import shardoptim
from tests.oracle import make_params


def _raises_like_torch(build):
    """``build(module)`` must raise in torch.optim and in shardoptim with the same type and message."""
    with pytest.raises(Exception) as theirs:
        build(torch.optim)
    with pytest.raises(theirs.type, match=re.escape(str(theirs.value))):
        build(shardoptim)


@pytest.mark.parametrize(
    "params",
    [
        lambda ps: [{"params": set(ps)}],
        lambda ps: [],
        lambda ps: ps[0],
        lambda ps: [ps[0], ps[0] * 2],
        lambda ps: [{"params": ps[:2]}, {"params": ps[1:]}],
        lambda ps: [{"lr": 0.1}],
        lambda ps: [1.0, 2.0],
        lambda ps: [("a", ps[0]), ps[1]],
    ],
    ids=["set", "empty", "tensor", "non-leaf", "shared-across-groups", "group-without-params", "numbers",
         "names-mixed"],
)
def test_construction_errors_match_torch(params):
    _raises_like_torch(lambda module: module.Adam(params(make_params())))


def test_constructs_from_tensors_names_and_groups_like_torch():
    inputs = [
        lambda ps: ps,
        lambda ps: iter(ps),
        lambda ps: [(f"p{i}", p) for i, p in enumerate(ps)],
        lambda ps: [{"params": ps[:2], "lr": 0.5}, {"params": ps[2:], "betas": (0.5, 0.6)}],
        lambda ps: [{"params": [(f"p{i}", p) for i, p in enumerate(ps[:3])]}, {"params": [("q", ps[3])]}],
    ]
    for build in inputs:
        ours = shardoptim.Adam(build(make_params()), lr=0.01)
        theirs = torch.optim.Adam(build(make_params()), lr=0.01)
        assert len(ours.param_groups) == len(theirs.param_groups)
        for a, b in zip(ours.param_groups, theirs.param_groups):
            assert {k: v for k, v in a.items() if k != "params"} == {k: v for k, v in b.items() if k != "params"}
        assert ours.defaults == theirs.defaults
        assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


def test_duplicate_parameters_warn_like_torch():
    params = make_params()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        torch.optim.SGD([params[0], params[0]], lr=0.1)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        shardoptim.SGD([params[0], params[0]], lr=0.1)


def test_is_a_torch_optimizer():
    assert isinstance(shardoptim.Adam(make_params()), torch.optim.Optimizer)


def test_parameters_keep_identity_and_values_and_live_in_the_flat_buffer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    before = [(p, p.detach().clone()) for p in model.parameters()]
    opt = shardoptim.SGD(model.parameters(), lr=0.1)
    (bucket,) = opt.buckets
    for (param, value), after in zip(before, model.parameters()):
        assert param is after
        assert torch.equal(param, value)
        assert _shares_storage(param, bucket.flat_param)
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size(), "a storage of its own"
    bucket.flat_param.add_(1.0)
    for param, value in before:
        assert torch.equal(param, value + 1.0), "parameters must see updates of the flat buffer"


def test_gradients_land_in_the_flat_buffer_without_copies_when_kept():
    model = torch.nn.Linear(4, 3)
    opt = shardoptim.Adam(model.parameters())
    (bucket,) = opt.buckets
    x = torch.randn(5, 4)
    model(x).sum().backward()  # first gradient: moved into the flat buffer by the hook
    grads = [p.grad for p in model.parameters()]
    assert all(_shares_storage(g, bucket.flat_grad) for g in grads)
    opt.zero_grad(set_to_none=False)
    model(x).sum().backward()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads)), "accumulation must stay in place"
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    reference(x).sum().backward()
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, r.grad)


def test_gradient_accumulation_across_backward_calls_matches_torch():
    ours_model, torch_model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    torch_model.load_state_dict(ours_model.state_dict())
    ours, theirs = shardoptim.SGD(ours_model.parameters(), lr=0.1), torch.optim.SGD(torch_model.parameters(), lr=0.1)
    for step in range(3):
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad()
            for micro in range(3):
                model(torch.full((2, 3), float(micro + step))).pow(2).sum().backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_matches_torch(set_to_none):
    for module in (torch.optim, shardoptim):
        params = make_params()
        opt = module.Adam(params)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            assert all(p.grad is None for p in params)
        else:
            assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def test_step_returns_closure_loss_and_runs_closure_with_grad_enabled():
    params = make_params()
    opt = shardoptim.SGD(params, lr=0.1)

    def closure():
        assert torch.is_grad_enabled()
        loss = sum((p**2).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert opt.step() is None


def test_step_and_state_dict_hooks_behave_as_torch():
    for module in (torch.optim, shardoptim):
        params = make_params()
        opt = module.Adam(params)
        calls = []
        handles = [
            opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre")),
            opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post")),
            opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre")),
            opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1}),
            opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre")),
            opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post")),
        ]
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        saved = opt.state_dict()
        opt.load_state_dict(saved)
        assert calls == ["pre", "post", "sd-pre", "load-pre", "load-post"], module
        assert saved["extra"] == 1
        for handle in handles:
            handle.remove()
        opt.step()
        assert len(calls) == 5


def test_state_is_keyed_by_parameter_and_shaped_like_it():
    params = make_params()
    opt = shardoptim.Adam(params, amsgrad=True)
    assert len(opt.state) == 0
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in params:
        entry = opt.state[p]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert entry["step"].shape == () and entry["step"].item() == 1.0
        assert all(entry[k].shape == p.shape for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


def _trained_adam():
    params = make_params()
    opt = shardoptim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda sd: sd["param_groups"].pop(),
        lambda sd: sd["param_groups"][0]["params"].pop(),
        lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3)),
        lambda sd: sd["state"][4].__setitem__("exp_avg_sq", torch.zeros(34)),
        lambda sd: sd["state"][2].__setitem__("momentum_buffer", torch.zeros(3, 4, 2)),
        lambda sd: sd["param_groups"][1].__setitem__("lr", -1.0),
    ],
    ids=["group-count", "group-size", "state-size", "last-state-size", "unknown-state", "invalid-lr"],
)
def test_failed_load_state_dict_raises_and_changes_nothing(corrupt):
    params, opt = _trained_adam()
    good = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][0]["exp_avg"].fill_(123.0)
    bad["param_groups"][0]["lr"] = 0.5
    corrupt(bad)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == good["param_groups"]
    for index, entry in good["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)


def test_repr_names_the_algorithm_buckets_and_hyperparameters():
    text = repr(shardoptim.AdamW(make_params(), lr=0.25))
    assert text.startswith("AdamW [1 flat buckets")
    assert "Parameter Group 0" in text and "lr: 0.25" in text


def test_mixed_dtypes_get_one_bucket_each_and_step_like_torch():
    def build(module):
        params = make_params() + make_params(torch.float64, seed=1)
        return params, module.Adam(params, lr=0.05)

    ours_params, ours = build(shardoptim)
    torch_params, theirs = build(torch.optim)
    assert len(ours.buckets) == 2
    for _ in range(5):
        for a, b in zip(ours_params, torch_params):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a, b)


def test_state_dict_saved_with_torch_save_loads_without_pickled_objects(tmp_path):
    params, opt = _trained_adam()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = shardoptim.Adam([{"params": [torch.nn.Parameter(p.detach().clone()) for p in params[:2]]},
                             {"params": [torch.nn.Parameter(p.detach().clone()) for p in params[2:]]}], lr=0.01)
    fresh.load_state_dict(loaded)
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(fresh.state_dict()["state"][index][key], value)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_eager_update_in_chunks_matches_torch(monkeypatch, name):
    """The foreach path splits a flat shard into chunks; chunk edges must not change any number."""
    import shardoptim.core.tensorlist as tensorlist
    from tests.oracle import assert_same_trajectory, run_side_by_side

    monkeypatch.setattr(tensorlist, "EAGER_CHUNK_NUMEL", 7)
    kwargs = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01, amsgrad=True)
    ours, theirs, _, _ = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, foreach=True, **kwargs),
        lambda ps: getattr(torch.optim, name)(ps, foreach=True, **kwargs),
    )
    assert_same_trajectory(ours, theirs, torch.float32)


def _shares_storage(tensor, flat):
    """Whether ``tensor``'s memory lies inside ``flat``'s (it may be a storage of its own over it)."""
    start = flat.data_ptr()
    return start <= tensor.data_ptr() < start + flat.numel() * flat.element_size()


class _Net(torch.nn.Module):
    """One weight at least ``LARGE_GRAD_NUMEL``, small ones, one left out of some steps, one never used."""

    def __init__(self):
        super().__init__()
        self.big = torch.nn.Linear(256, 256)
        assert self.big.weight.numel() >= shardoptim.core.bucket.LARGE_GRAD_NUMEL > self.big.bias.numel()
        self.head = torch.nn.Linear(256, 4)
        self.sometimes = torch.nn.Linear(256, 4)
        self.never = torch.nn.Parameter(torch.randn(8))

    def forward(self, x, step, intermittent):
        h = torch.tanh(self.big(x))
        out = self.head(h).pow(2).mean()
        if not intermittent or step % 3 != 1:
            out = out + self.sometimes(h).mean()
        return out


@pytest.mark.parametrize("scenario", ["every-step", "intermittent", "clip"])
@pytest.mark.parametrize(
    "algorithm, kwargs",
    [("AdamW", {"lr": 1e-2, "weight_decay": 0.1}), ("SGD", {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.01})],
)
def test_large_fresh_gradients_are_read_in_place_and_train_like_torch(algorithm, kwargs, scenario):
    torch.manual_seed(0)
    reference = _Net()
    runs = {
        "ours": (shardoptim, {}),
        "torch fused": (torch.optim, {"fused": True}),
        "torch for-loop": (torch.optim, {"foreach": False}),
    }
    models = {name: copy.deepcopy(reference) for name in runs}
    opts = {name: getattr(module, algorithm)(models[name].parameters(), **kwargs, **flags)
            for name, (module, flags) in runs.items()}
    (bucket,) = opts["ours"].buckets
    gen = torch.Generator().manual_seed(1)
    for step in range(30):
        batches = [torch.randn(16, 256, generator=gen) for _ in range(2)]
        for name, model in models.items():
            for x in batches:  # two backward calls accumulate
                model(x, step, intermittent=scenario == "intermittent").backward()
            if name == "ours":
                big = model.big.weight
                assert not _shares_storage(big.grad, bucket.flat_grad), "the large gradient must not be copied"
                assert all(_shares_storage(p.grad, bucket.flat_grad) for p in (model.big.bias, model.head.weight))
                assert all(_shares_storage(p, bucket.flat_param) for p in model.parameters())
                kept = big.grad
            if scenario == "clip":
                clip = opts[name].clip_grad_norm_ if name == "ours" else (
                    lambda norm, m=model: torch.nn.utils.clip_grad_norm_(m.parameters(), norm))
                clip(1.0)
            opts[name].step()
            if name == "ours" and scenario == "every-step":  # others fall back to copying, as before
                assert big.grad is kept, "step() must leave the user's gradient tensor in .grad"
            opts[name].zero_grad(set_to_none=True)
    ours = dict(models["ours"].named_parameters())
    assert torch.equal(ours["never"], reference.never)
    for name in ("torch fused", "torch for-loop"):
        for key, theirs in models[name].named_parameters():
            torch.testing.assert_close(ours[key], theirs, rtol=1e-5, atol=1e-6, msg=f"{key} vs {name}")
