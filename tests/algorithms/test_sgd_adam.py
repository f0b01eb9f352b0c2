"""SGD, Adam and AdamW against torch.optim: every option combination, each implementation."""

from __future__ import annotations

import itertools

import pytest
import torch

import shardoptim
from tests.oracle import SHAPES, assert_same_trajectory, make_params, run_side_by_side


def _sgd_options():
    for momentum, dampening, nesterov, weight_decay, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.2), (False, True), (0.0, 0.1), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        if momentum == 0 and dampening != 0:
            continue
        yield dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov,
                   weight_decay=weight_decay, maximize=maximize)


def _adam_options(decoupled_flag: bool):
    for amsgrad, maximize, weight_decay in itertools.product((False, True), (False, True), (0.0, 0.1)):
        base = dict(lr=0.01, betas=(0.8, 0.99), amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay)
        yield base
        if decoupled_flag:
            yield {**base, "decoupled_weight_decay": True}


CASES = (
    [("SGD", kw) for kw in _sgd_options()]
    + [("Adam", kw) for kw in _adam_options(decoupled_flag=True)]
    + [("AdamW", kw) for kw in _adam_options(decoupled_flag=False)]
)

#: Our implementation flag -> the torch implementation it is compared with.
IMPLEMENTATIONS = {
    "default": ({}, {"foreach": False}),
    "for-loop": ({"foreach": False}, {"foreach": False}),
    "foreach": ({"foreach": True}, {"foreach": True}),
    "fused": ({"fused": True}, {"fused": True}),
}


def _case_id(case):
    name, kwargs = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("lr", "betas"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_torch(case, implementation, dtype):
    name, kwargs = case
    ours_flags, torch_flags = IMPLEMENTATIONS[implementation]
    ours, theirs, _, _ = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, **kwargs, **ours_flags),
        lambda ps: getattr(torch.optim, name)(ps, **kwargs, **torch_flags),
        dtype=dtype,
    )
    assert_same_trajectory(ours, theirs, dtype)


GROUPED = [("SGD", dict(lr=0.05, momentum=0.9)), ("Adam", dict(lr=0.01)), ("AdamW", dict(lr=0.01, amsgrad=True))]


def _groups(params, **override):
    return [{"params": params[:2]}, {"params": params[2:4], "lr": 0.003, "weight_decay": 0.2, **override},
            {"params": params[4:]}]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("name,kwargs", GROUPED)
def test_param_groups_and_missing_grads(name, kwargs, implementation):
    ours_flags, _ = IMPLEMENTATIONS[implementation]
    torch_flags = {"foreach": False}  # torch's fused SGD fails on a None gradient; for-loop is the reference
    # Parameter 1 never has a gradient; parameter 3 skips every third step; param 0 skips early on.
    skip = lambda step, i: i == 1 or (i == 3 and step % 3 == 0) or (i == 0 and step < 4)  # noqa: E731
    ours, theirs, our_opt, their_opt = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(_groups(ps), **kwargs, **ours_flags),
        lambda ps: getattr(torch.optim, name)(_groups(ps), **kwargs, **torch_flags),
        skip=skip,
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert torch.equal(ours[1], make_params()[1]), "a parameter without gradients must not move"
    _assert_same_state(our_opt.state_dict(), their_opt.state_dict())


def _assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        assert ours["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            torch.testing.assert_close(ours["state"][index][key], value, atol=1e-5, rtol=1e-5)
    flags = ("foreach", "fused")  # which implementation ran may differ by design
    for ours_group, their_group in zip(ours["param_groups"], theirs["param_groups"]):
        assert {k: v for k, v in ours_group.items() if k not in flags} == {
            k: v for k, v in their_group.items() if k not in flags
        }


@pytest.mark.parametrize("name,kwargs", GROUPED)
def test_add_param_group_mid_run(name, kwargs):
    def between(step, ours, theirs):
        if step == 9:
            extra = make_params(shapes=[(4, 3)], seed=7)
            ours.add_param_group({"params": [extra[0]], "lr": 0.02})
            theirs.add_param_group({"params": [make_params(shapes=[(4, 3)], seed=7)[0]], "lr": 0.02})
            between.extra = extra[0], theirs.param_groups[-1]["params"][0]
        if step >= 9:
            grad = torch.full((4, 3), 0.1 * step)
            a, b = between.extra
            a.grad, b.grad = grad.clone(), grad.clone()

    _, _, ours, theirs = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, **kwargs),
        lambda ps: getattr(torch.optim, name)(ps, **kwargs, foreach=False),
        between=between,
        steps=20,
    )
    a, b = between.extra
    torch.testing.assert_close(a.detach(), b.detach())
    _assert_same_state(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch", "ours->ours"])
@pytest.mark.parametrize("name,kwargs", GROUPED + [("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1))])
def test_state_dict_round_trip_then_continue(name, kwargs, direction):
    """Half the steps in one optimizer, the rest in a fresh one loaded from its state dict."""
    make = {"ours": lambda ps: getattr(shardoptim, name)(_groups(ps), **kwargs),
            "torch": lambda ps: getattr(torch.optim, name)(_groups(ps), **kwargs, foreach=False)}
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
        for p, r in zip(params, reference):
            p.grad = 0.5 * p.detach() + torch.randn(p.shape, generator=gen)
            r.grad = 0.5 * r.detach() + torch.randn(r.shape, generator=gen_ref)
        opt.step()
        reference_opt.step()
    assert_same_trajectory(params, reference, torch.float32)


def test_complex_parameters_match_torch():
    for name, kwargs in GROUPED + [("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1))]:
        for flags in ({}, {"foreach": True}, {"foreach": False}):
            ours, theirs, _, _ = run_side_by_side(
                lambda ps: getattr(shardoptim, name)(ps, **kwargs, **flags),
                lambda ps: getattr(torch.optim, name)(ps, **kwargs, foreach=False),
                dtype=torch.complex64,
            )
            assert_same_trajectory(ours, theirs, torch.complex64)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("flags", [{}, {"foreach": False}, {"fused": True}], ids=str)
def test_tensor_learning_rate(name, flags):
    kwargs = dict(momentum=0.9) if name == "SGD" else {}
    ours, theirs, our_opt, _ = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, lr=torch.tensor(0.01), **kwargs, **flags),
        lambda ps: getattr(torch.optim, name)(ps, lr=torch.tensor(0.01), **kwargs, foreach=False),
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert isinstance(our_opt.param_groups[0]["lr"], torch.Tensor)


def test_learning_rate_changed_between_steps_is_used():
    def decay(step, ours, theirs):
        for opt in (ours, theirs):
            opt.param_groups[0]["lr"] *= 0.9
            opt.param_groups[0]["betas"] = (0.85, 0.995)

    ours, theirs, _, _ = run_side_by_side(
        lambda ps: shardoptim.Adam(ps, lr=0.05), lambda ps: torch.optim.Adam(ps, lr=0.05), between=decay
    )
    assert_same_trajectory(ours, theirs, torch.float32)


def test_model_training_matches_torch_with_zero_grad_and_closure():
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    torch_model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    torch_model.load_state_dict(ours_model.state_dict())
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    ours = shardoptim.AdamW(ours_model.parameters(), lr=0.01)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=0.01)
    for step in range(50):
        losses = []
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            def closure(model=model, opt=opt):
                opt.zero_grad(set_to_none=step % 2 == 0)
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure))
        torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("SGD", dict(lr=-1.0)), ("SGD", dict(momentum=-0.5)), ("SGD", dict(weight_decay=-1.0)),
        ("SGD", dict(nesterov=True)), ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1)),
        ("SGD", dict(lr=torch.tensor([0.1, 0.2]))),
        ("Adam", dict(lr=-1.0)), ("Adam", dict(eps=-1.0)), ("Adam", dict(betas=(1.0, 0.9))),
        ("Adam", dict(betas=(0.9, -0.1))), ("Adam", dict(weight_decay=-0.1)),
        ("AdamW", dict(betas=(1.5, 0.9))), ("AdamW", dict(lr=-0.1)),
        ("Adam", dict(fused=True, foreach=True)),
    ],
    ids=str,
)
def test_invalid_hyperparameters_raise_as_torch(name, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(torch.optim, name)(make_params(), **kwargs)
    with pytest.raises(theirs.type, match=_escaped(str(theirs.value))):
        getattr(shardoptim, name)(make_params(), **kwargs)
    # The same value as a per-group override is rejected too (torch accepts those silently).
    if "fused" not in kwargs:
        with pytest.raises(theirs.type):
            getattr(shardoptim, name)([{"params": make_params()[:2]}, {"params": make_params()[2:], **kwargs}])


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def test_unsupported_options_name_the_option():
    for option in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=option):
            shardoptim.Adam(make_params(), **{option: True})


def test_shapes_cover_alignment_edge_cases():
    assert any(len(shape) == 0 for shape in SHAPES) and any(
        shape and torch.Size(shape).numel() % 16 for shape in SHAPES
    )
