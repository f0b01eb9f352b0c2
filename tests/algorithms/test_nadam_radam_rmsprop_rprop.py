"""NAdam, RAdam, RMSprop and Rprop against torch.optim: one table of cases drives every test."""

from __future__ import annotations

import inspect
import itertools
import math
import re
import warnings

import pytest
import torch
import torch._dynamo

import shardoptim
from shardoptim.algorithms import nadam, radam
from shardoptim.core import GroupView
from tests.oracle import assert_same_trajectory, make_params, run_side_by_side


def _options(**choices):
    """Every combination of the given keyword values."""
    keys = list(choices)
    for values in itertools.product(*choices.values()):
        yield dict(zip(keys, values))


CASES = (
    [("NAdam", dict(lr=0.01, betas=(0.8, 0.99), **kw)) for kw in _options(
        weight_decay=(0.0, 0.1), decoupled_weight_decay=(False, True), momentum_decay=(4e-3, 0.02),
        maximize=(False, True))]
    + [("RAdam", dict(lr=0.01, **kw)) for kw in _options(
        betas=((0.9, 0.999), (0.8, 0.99)), weight_decay=(0.0, 0.1), decoupled_weight_decay=(False, True),
        maximize=(False, True))]
    + [("RMSprop", dict(lr=0.01, **kw)) for kw in _options(
        momentum=(0.0, 0.9), centered=(False, True), weight_decay=(0.0, 0.1), maximize=(False, True))]
    + [("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True))]
    + [("Rprop", dict(lr=0.01, **kw)) for kw in _options(
        etas=((0.5, 1.2), (0.3, 1.7)), step_sizes=((1e-6, 50), (1e-3, 0.05)), maximize=(False, True))]
)

#: The main options of each algorithm, for the compiled default. Each distinct set of flags and
#: constant hyper-parameters is one more graph; torch.compile allows 8 per function.
DEFAULT_CASES = [
    ("NAdam", dict(lr=0.01, betas=(0.8, 0.99))),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=0.02, maximize=True)),
    ("RAdam", dict(lr=0.01)),
    ("RAdam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, weight_decay=0.1, maximize=True)),
    ("Rprop", dict(lr=0.01)),
    ("Rprop", dict(lr=0.01, etas=(0.3, 1.7), step_sizes=(1e-3, 0.05), maximize=True)),
]

NAMES = ["NAdam", "RAdam", "RMSprop", "Rprop"]

#: Per algorithm, what a second param group overrides besides its lr.
OVERRIDES = {
    "NAdam": dict(weight_decay=0.2, betas=(0.7, 0.95), momentum_decay=0.01),
    "RAdam": dict(weight_decay=0.2, betas=(0.7, 0.95), decoupled_weight_decay=True),
    "RMSprop": dict(weight_decay=0.2, alpha=0.9, momentum=0.0, centered=False),
    "Rprop": dict(etas=(0.4, 1.5), step_sizes=(1e-4, 1.0)),
}

OUR_FLAGS = {"default": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}

#: torch's implementation each of ours is compared with: its for-loop, or its foreach for our foreach.
#: (torch has no fused kernel for these four; ours compiles the update.)
TORCH_FLAGS = {"default": {"foreach": False}, "for-loop": {"foreach": False}, "foreach": {"foreach": True},
               "fused": {"foreach": False}}


@pytest.fixture(autouse=True, scope="module")
def _fresh_compiler_caches():
    """Start this module with empty compiler caches, so graphs compiled by earlier modules do not count
    towards torch.compile's limit of 8 graphs per function (this module stays within it)."""
    torch._dynamo.reset()
    yield


def _case_id(case):
    name, kwargs = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr")


def _run(name, kwargs, implementation, dtype=torch.float32, **harness):
    return run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, **kwargs, **OUR_FLAGS[implementation]),
        lambda ps: getattr(torch.optim, name)(ps, **kwargs, **TORCH_FLAGS[implementation]),
        dtype=dtype,
        **harness,
    )


def _main_options(name: str, which: int = 0) -> dict:
    return dict(DEFAULT_CASES[NAMES.index(name) * 2 + which][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_torch(case, implementation, dtype):
    ours, theirs, _, _ = _run(*case, implementation, dtype)
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
        {"params": params[2:4], "lr": 0.003, **OVERRIDES[name]},
        {"params": params[4:]},
    ]


def _skip(step, i):
    """Parameter 1 never has a gradient; 3 skips every third step; 0 skips the first four."""
    return i == 1 or (i == 3 and step % 3 == 0) or (i == 0 and step < 4)


def _schedule(step, *optimizers):
    """What schedulers do between steps: a new lr, and a cycled beta1 or momentum (CyclicLR, OneCycleLR)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * 0.95
            if "betas" in group:
                group["betas"] = (group["betas"][0] * 0.99, group["betas"][1])
            if group.get("momentum", 0) > 0:
                group["momentum"] = 0.5 + 0.4 * math.cos(step)


def _assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        assert ours["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            assert ours["state"][index][key].shape == value.shape, (index, key)
            torch.testing.assert_close(ours["state"][index][key], value, atol=1e-5, rtol=1e-5)
    flags = ("foreach", "fused")  # which implementation ran may differ by design; torch's have no fused
    for ours_group, their_group in zip(ours["param_groups"], theirs["param_groups"]):
        assert {k: v for k, v in ours_group.items() if k not in flags} == {
            k: v for k, v in their_group.items() if k not in flags
        }


@pytest.mark.parametrize("implementation", ["default", "for-loop", "foreach"])
@pytest.mark.parametrize("name", NAMES)
def test_param_groups_missing_grads_and_schedules(name, implementation):
    """Per-group overrides, parameters without gradients on some steps, and hyper-parameters changed
    before every step.

    With skipped steps, parameters of one bucket sit at different step counts, start their state
    under different learning rates (Rprop's ``step_size``) and carry ``mu_product``s taken over
    different ``beta1``s (NAdam), which the base must keep apart.
    """
    kwargs = _main_options(name)
    ours, theirs, our_opt, their_opt = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(_groups(name, ps), **kwargs, **OUR_FLAGS[implementation]),
        lambda ps: getattr(torch.optim, name)(_groups(name, ps), **kwargs, foreach=False),
        skip=_skip,
        between=lambda step, a, b: _schedule(step, a, b),
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert torch.equal(ours[1], make_params()[1]), "a parameter without gradients must not move"
    _assert_same_state(our_opt.state_dict(), their_opt.state_dict())


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch", "ours->ours"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_then_continue(name, direction):
    """Half the steps in one optimizer, the rest in a fresh one loaded from its state dict."""
    kwargs = _main_options(name, 1)
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
        _schedule(step, opt, reference_opt)
    assert_same_trajectory(params, reference, torch.float32)
    _assert_same_state(opt.state_dict(), reference_opt.state_dict())


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"foreach": False}], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_match_torch(name, flags):
    kwargs = _main_options(name)
    ours, theirs, our_opt, their_opt = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, **kwargs, **flags),
        lambda ps: getattr(torch.optim, name)(ps, **kwargs, foreach=False),
        dtype=torch.complex64,
    )
    assert_same_trajectory(ours, theirs, torch.complex64)
    _assert_same_state(our_opt.state_dict(), their_opt.state_dict())


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"foreach": False}], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_tensor_learning_rate(name, flags):
    kwargs = {k: v for k, v in _main_options(name).items() if k != "lr"}
    ours, theirs, our_opt, _ = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, lr=torch.tensor(0.01), **kwargs, **flags),
        lambda ps: getattr(torch.optim, name)(ps, lr=torch.tensor(0.01), **kwargs, foreach=False),
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert isinstance(our_opt.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_update_never_recompiles(name):
    """After the first step, new learning rates, betas and momenta, and RAdam's switch to the
    rectified step (around step 6), all reuse the same graph."""
    ours = make_params()
    opt = getattr(shardoptim, name)(ours, **_main_options(name))

    def step():
        for p in ours:
            p.grad = torch.randn_like(p)
        opt.step()

    # A compiler failure would fall back to eager with a RuntimeWarning, and pass for the wrong reason.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        step()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(25):
                _schedule(i, opt)
                step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert all(torch.isfinite(p).all() for p in ours)


@pytest.mark.parametrize("implementation", ["default", "for-loop", "foreach"])
def test_nadam_mu_product_is_a_running_product(implementation):
    """torch multiplies ``mu_product`` by each step's momentum coefficient, with the ``beta1`` of that
    step; a product recomputed from the current ``beta1`` would differ once a scheduler moved it."""

    def cycle_beta1(step, *optimizers):
        for opt in optimizers:
            opt.param_groups[0]["betas"] = (0.9 - 0.3 * abs(math.sin(step / 4)), 0.999)

    ours, theirs, our_opt, their_opt = _run("NAdam", _main_options("NAdam"), implementation, between=cycle_beta1)
    assert_same_trajectory(ours, theirs, torch.float32)
    _assert_same_state(our_opt.state_dict(), their_opt.state_dict())
    h = GroupView(their_opt.param_groups[0])
    closed_form = nadam.scalar_state(h, 50)["mu_product"]
    assert not math.isclose(closed_form, their_opt.state[theirs[0]]["mu_product"].item(), rel_tol=1e-3)


def test_radam_runs_both_regimes_within_the_tested_steps():
    """RAdam's plain step (rho_t <= 5) comes first and its rectified step later, so 50 steps test both."""
    h = GroupView(dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.0))
    first, last = radam.scalars(h, 1), radam.scalars(h, 50)
    assert first.adaptive_step == 0 and first.plain_step < 0
    assert last.plain_step == 0 and last.adaptive_step < 0


def test_state_is_torch_shaped():
    """Every state entry has torch's key, shape and dtype: 0-D ``step``/``mu_product``, per-element others."""
    for name in NAMES:
        _, _, ours, theirs = _run(name, _main_options(name), "foreach", steps=3)
        for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"]):
            assert ours.state[p].keys() == theirs.state[q].keys(), name
            for key, value in theirs.state[q].items():
                assert ours.state[p][key].shape == value.shape, (name, key)
                assert ours.state[p][key].dtype == value.dtype, (name, key)


INVALID = [
    *[(name, dict(lr=-1.0)) for name in NAMES],
    *[(name, dict(lr=torch.tensor([0.1, 0.2]))) for name in NAMES],
    *[(name, dict(eps=-1.0)) for name in ("NAdam", "RAdam", "RMSprop")],
    *[(name, dict(weight_decay=-0.1)) for name in ("NAdam", "RAdam", "RMSprop")],
    *[(name, dict(betas=betas)) for name in ("NAdam", "RAdam") for betas in ((1.0, 0.9), (0.9, -0.1))],
    ("NAdam", dict(momentum_decay=-0.1)),
    ("RMSprop", dict(momentum=-0.1)), ("RMSprop", dict(alpha=-0.1)),
    ("Rprop", dict(etas=(1.5, 1.2))), ("Rprop", dict(etas=(0.5, 0.9))), ("Rprop", dict(etas=(0.0, 1.2))),
]


@pytest.mark.parametrize("name,kwargs", INVALID, ids=str)
def test_invalid_hyperparameters_raise_as_torch(name, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(torch.optim, name)(make_params(), **kwargs)
    with pytest.raises(theirs.type, match=re.escape(str(theirs.value))):
        getattr(shardoptim, name)(make_params(), **kwargs)
    # The same value as a per-group override is rejected too (torch accepts those silently).
    with pytest.raises(theirs.type, match=re.escape(str(theirs.value))):
        getattr(shardoptim, name)([{"params": make_params()[:2]}, {"params": make_params()[2:], **kwargs}])


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_options_name_the_option(name):
    for option in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=option):
            getattr(shardoptim, name)(make_params(), **{option: True})
    with pytest.raises(RuntimeError, match="fused"):
        getattr(shardoptim, name)(make_params(), fused=True, foreach=True)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_matches_torch(name):
    """torch's arguments with torch's defaults and kinds (positional or keyword-only); ours come after."""
    ours = inspect.signature(getattr(shardoptim, name)).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    for arg, spec in theirs.items():
        assert arg in ours, arg
        assert (ours[arg].default, ours[arg].kind) == (spec.default, spec.kind), arg
    assert list(ours)[: len([a for a in theirs.values() if a.kind is not a.KEYWORD_ONLY])] == [
        a for a, spec in theirs.items() if spec.kind is not spec.KEYWORD_ONLY
    ]
    assert {arg for arg in ours if arg not in theirs} == {"fused", "process_group", "reduce_grads"}
