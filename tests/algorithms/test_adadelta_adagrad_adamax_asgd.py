"""Adadelta, Adagrad, Adamax and ASGD against torch.optim: one table of cases drives every test."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch._dynamo

import shardoptim
from tests.oracle import assert_same_trajectory, make_params, run_side_by_side


def _options(**choices):
    """Every combination of the given keyword values."""
    keys = list(choices)
    for values in itertools.product(*choices.values()):
        yield dict(zip(keys, values))


CASES = (
    [("Adadelta", dict(lr=0.5, **kw))
     for kw in _options(rho=(0.9, 0.6), weight_decay=(0.0, 0.1), maximize=(False, True))]
    + [("Adagrad", dict(lr=0.05, **kw)) for kw in _options(
        lr_decay=(0.0, 0.01), weight_decay=(0.0, 0.1), initial_accumulator_value=(0.0, 0.1), maximize=(False, True))]
    + [("Adamax", dict(lr=0.01, betas=(0.8, 0.99), **kw))
       for kw in _options(weight_decay=(0.0, 0.1), maximize=(False, True))]
    + [("ASGD", dict(lr=0.05, **kw)) for kw in _options(
        lambd=(1e-4, 0.02), t0=(1e6, 10.0), weight_decay=(0.0, 0.1), maximize=(False, True))]
)

#: The main options of each algorithm, for the compiled default (each distinct set compiles a graph).
DEFAULT_CASES = [
    ("Adadelta", dict(lr=0.5)),
    ("Adadelta", dict(lr=0.5, rho=0.6, weight_decay=0.1, maximize=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("Adagrad", dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("Adamax", dict(lr=0.01)),
    ("Adamax", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True)),
    ("ASGD", dict(lr=0.05, lambd=0.02, t0=10.0)),
    ("ASGD", dict(lr=0.05, lambd=0.02, t0=10.0, weight_decay=0.1, maximize=True)),
]

NAMES = ["Adadelta", "Adagrad", "Adamax", "ASGD"]
COMPILED = ["Adadelta", "Adamax", "ASGD"]  # no torch kernel: the default compiles the update

#: Per algorithm, hyper-parameters a second param group overrides (besides lr and weight_decay).
OVERRIDES = {
    "Adadelta": dict(rho=0.7),
    "Adagrad": dict(lr_decay=0.05),
    "Adamax": dict(betas=(0.7, 0.95)),
    "ASGD": dict(lambd=0.01, t0=5.0, alpha=0.6),
}


def _reference_flags(name: str, implementation: str) -> dict:
    """The torch implementation ours is compared with.

    Our update is written once, in the form of torch's for-loop. torch's foreach ASGD rearranges the
    arithmetic (it differs from torch's own for-loop by ~1e-6 in float32, more than float64's
    tolerance), so our ASGD is always compared with torch's for-loop.
    """
    if implementation == "foreach" and name != "ASGD":
        return {"foreach": True}
    if implementation == "fused" and name == "Adagrad":
        return {"fused": True}
    return {"foreach": False}


OUR_FLAGS = {"default": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _case_id(case):
    name, kwargs = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("lr", "betas"))


def _run(name, kwargs, implementation, dtype=torch.float32, **harness):
    return run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, **kwargs, **OUR_FLAGS[implementation]),
        lambda ps: getattr(torch.optim, name)(ps, **kwargs, **_reference_flags(name, implementation)),
        dtype=dtype,
        **harness,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_torch(case, implementation, dtype):
    ours, theirs, _, _ = _run(*case, implementation, dtype)
    assert_same_trajectory(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [case for case in CASES if case[0] == "Adagrad"], ids=_case_id)
def test_adagrad_fused_matches_torch_fused(case, dtype):
    ours, theirs, _, _ = _run(*case, "fused", dtype)
    assert_same_trajectory(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("implementation", ["default", "fused"])
@pytest.mark.parametrize("case", DEFAULT_CASES, ids=_case_id)
def test_default_and_fused_match_torch(case, implementation, dtype):
    ours, theirs, _, _ = _run(*case, implementation, dtype)
    assert_same_trajectory(ours, theirs, dtype)


def _groups(name, params):
    return [
        {"params": params[:2]},
        {"params": params[2:4], "lr": 0.003, "weight_decay": 0.2, **OVERRIDES[name]},
        {"params": params[4:]},
    ]


def _skip(step, i):
    """Parameter 1 never has a gradient; 3 skips every third step; 0 skips the first four."""
    return i == 1 or (i == 3 and step % 3 == 0) or (i == 0 and step < 4)


def _decay_lr(step, *optimizers):
    """What a scheduler does: a new lr in every group before the next step."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * 0.95


def _assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        assert ours["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            torch.testing.assert_close(ours["state"][index][key], value, atol=1e-5, rtol=1e-5)
    flags = ("foreach", "fused")  # which implementation ran may differ by design; torch's Adadelta has no fused
    for ours_group, their_group in zip(ours["param_groups"], theirs["param_groups"]):
        assert {k: v for k, v in ours_group.items() if k not in flags} == {
            k: v for k, v in their_group.items() if k not in flags
        }


@pytest.mark.parametrize("implementation", ["default", "for-loop", "foreach"])
@pytest.mark.parametrize("name", NAMES)
def test_param_groups_missing_grads_and_changing_lr(name, implementation):
    """Per-group overrides, parameters without gradients on some steps, and a new lr every step.

    With skipped steps, parameters of one bucket sit at different step counts (and, for ASGD, carry
    an ``eta`` computed under different learning rates), which the base must keep apart.
    """
    kwargs = dict(DEFAULT_CASES[NAMES.index(name) * 2][1])
    ours, theirs, our_opt, their_opt = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(_groups(name, ps), **kwargs, **OUR_FLAGS[implementation]),
        lambda ps: getattr(torch.optim, name)(_groups(name, ps), **kwargs, foreach=False),
        skip=_skip,
        between=lambda step, a, b: _decay_lr(step, a, b),
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert torch.equal(ours[1], make_params()[1]), "a parameter without gradients must not move"
    _assert_same_state(our_opt.state_dict(), their_opt.state_dict())


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch", "ours->ours"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_then_continue(name, direction):
    """Half the steps in one optimizer, the rest in a fresh one loaded from its state dict.

    The lr changes every step, so ASGD's saved ``eta`` (computed under the previous lr) matters.
    """
    kwargs = dict(DEFAULT_CASES[NAMES.index(name) * 2 + 1][1])
    make = {"ours": lambda ps: getattr(shardoptim, name)(_groups(name, ps), **kwargs),
            "torch": lambda ps: getattr(torch.optim, name)(_groups(name, ps), **kwargs, foreach=False)}
    source, target = direction.split("->")
    reference = make_params()
    reference_opt = make["torch"](reference)
    params = make_params()
    opt = make[source](params)
    gen, gen_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step in range(30):
        if step == 15:
            saved = opt.state_dict()
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = make[target](params)
            opt.load_state_dict(saved)
        for i, (p, r) in enumerate(zip(params, reference)):
            p.grad = 0.5 * p.detach() + torch.randn(p.shape, generator=gen)
            r.grad = 0.5 * r.detach() + torch.randn(r.shape, generator=gen_ref)
            if _skip(step, i):
                p.grad = r.grad = None
        opt.step()
        reference_opt.step()
        _decay_lr(step, opt, reference_opt)
    assert_same_trajectory(params, reference, torch.float32)
    _assert_same_state(opt.state_dict(), reference_opt.state_dict())


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"foreach": False}], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_match_torch(name, flags):
    kwargs = dict(DEFAULT_CASES[NAMES.index(name) * 2][1])
    ours, theirs, our_opt, their_opt = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, **kwargs, **flags),
        lambda ps: getattr(torch.optim, name)(ps, **kwargs, foreach=False),
        dtype=torch.complex64,
    )
    assert_same_trajectory(ours, theirs, torch.complex64)
    _assert_same_state(our_opt.state_dict(), their_opt.state_dict())


@pytest.mark.parametrize("flags", [{}, {"foreach": False}], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_tensor_learning_rate(name, flags):
    kwargs = {k: v for k, v in DEFAULT_CASES[NAMES.index(name) * 2][1].items() if k != "lr"}
    ours, theirs, our_opt, _ = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, lr=torch.tensor(0.01), **kwargs, **flags),
        lambda ps: getattr(torch.optim, name)(ps, lr=torch.tensor(0.01), **kwargs, foreach=False),
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert isinstance(our_opt.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_update_never_recompiles(name):
    """After the first step, new learning rates (and betas, eta, mu across t0) reuse the same graph."""
    kwargs = dict(DEFAULT_CASES[NAMES.index(name) * 2][1])
    ours = make_params()
    opt = getattr(shardoptim, name)(ours, **kwargs)
    for p in ours:
        p.grad = torch.randn_like(p)
    opt.step()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(25):
            for group in opt.param_groups:
                group["lr"] *= 0.9
                if "betas" in group:
                    group["betas"] = (0.9 - 0.01 * step, 0.999)  # as CyclicLR cycles momentum
            for p in ours:
                p.grad = torch.randn_like(p)
            opt.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert all(torch.isfinite(p).all() for p in ours)


INVALID = [
    *[(name, dict(lr=-1.0)) for name in NAMES],
    *[(name, dict(lr=torch.tensor([0.1, 0.2]))) for name in NAMES],
    *[(name, dict(weight_decay=-0.1)) for name in NAMES],
    ("Adadelta", dict(rho=1.5)), ("Adadelta", dict(rho=-0.1)), ("Adadelta", dict(eps=-1.0)),
    ("Adagrad", dict(lr_decay=-0.1)), ("Adagrad", dict(initial_accumulator_value=-0.1)),
    ("Adagrad", dict(eps=-1.0)), ("Adagrad", dict(fused=True, foreach=True)),
    ("Adamax", dict(eps=-1.0)), ("Adamax", dict(betas=(1.0, 0.9))), ("Adamax", dict(betas=(0.9, -0.1))),
]


@pytest.mark.parametrize("name,kwargs", INVALID, ids=str)
def test_invalid_hyperparameters_raise_as_torch(name, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(torch.optim, name)(make_params(), **kwargs)
    with pytest.raises(theirs.type, match=re.escape(str(theirs.value))):
        getattr(shardoptim, name)(make_params(), **kwargs)
    # The same value as a per-group override is rejected too (torch accepts those silently).
    if "fused" not in kwargs:
        with pytest.raises(theirs.type, match=re.escape(str(theirs.value))):
            getattr(shardoptim, name)([{"params": make_params()[:2]}, {"params": make_params()[2:], **kwargs}])


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_options_name_the_option(name):
    for option in ("capturable", "differentiable"):
        if option == "capturable" and name == "Adagrad":
            continue  # torch's Adagrad has no capturable option either
        with pytest.raises(ValueError, match=option):
            getattr(shardoptim, name)(make_params(), **{option: True})


def test_adagrad_state_exists_from_construction_as_in_torch():
    ours = shardoptim.Adagrad(_groups("Adagrad", make_params()), initial_accumulator_value=0.3)
    theirs = torch.optim.Adagrad(_groups("Adagrad", make_params()), initial_accumulator_value=0.3)
    _assert_same_state(ours.state_dict(), theirs.state_dict())


def test_adagrad_honours_a_per_group_initial_accumulator_value():
    params = make_params()
    opt = shardoptim.Adagrad([{"params": params[:2]}, {"params": params[2:], "initial_accumulator_value": 0.7}],
                             initial_accumulator_value=0.2)
    assert torch.equal(opt.state[params[0]]["sum"], torch.full_like(params[0], 0.2))
    assert torch.equal(opt.state[params[2]]["sum"], torch.full_like(params[2], 0.7))


def test_adagrad_share_memory_keeps_training():
    ours, theirs, our_opt, _ = run_side_by_side(
        lambda ps: shardoptim.Adagrad(ps, lr=0.05), lambda ps: torch.optim.Adagrad(ps, lr=0.05, foreach=False),
        between=lambda step, ours, theirs: ours.share_memory() if step == 3 else None,
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert all(entry["sum"].is_shared() for entry in our_opt.state.values())


def test_asgd_scalar_state_is_torch_shaped():
    """``eta``, ``mu`` and ``step`` are 0-D tensors of torch's dtype; ``ax`` is shaped like the parameter."""
    _, _, ours, theirs = _run("ASGD", dict(lr=0.05, t0=3.0, lambd=0.02), "default", steps=6)
    for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        for key in ("step", "eta", "mu"):
            assert ours.state[p][key].shape == () and ours.state[p][key].dtype == theirs.state[q][key].dtype
            torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], rtol=0, atol=0)
        assert ours.state[p]["ax"].shape == p.shape


def test_asgd_rejects_a_malformed_scalar_state():
    opt = shardoptim.ASGD(make_params(), t0=3.0)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["eta"] = torch.ones(3)
    before = opt.state_dict()["state"][0]["eta"].clone()
    with pytest.raises(ValueError, match="eta"):
        opt.load_state_dict(saved)
    assert torch.equal(opt.state_dict()["state"][0]["eta"], before)
