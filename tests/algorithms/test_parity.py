"""Generic tests for every elementwise algorithm against torch.optim, driven by the table in ``cases.py``."""

from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch
import torch._dynamo

import shardoptim
from tests.algorithms.cases import (
    ALGORITHMS, BY_NAME, COMPILED, DTYPES, IMPLEMENTATIONS, OUR_FLAGS, case_id, groups, run, schedule, skip,
)
from tests.oracle import SHAPES, assert_same_state, assert_same_trajectory, make_params, run_side_by_side


def _params(rows):
    """pytest parameters named ``Algorithm-options-...`` (options for a kwargs dict, else the values)."""
    def name(row):
        head = case_id(row[0], row[1]) if isinstance(row[1], dict) else f"{row[0]}-{row[1]}"
        return "-".join([head, *(str(part) for part in row[2:])])

    return [pytest.param(*row, id=name(row)) for row in rows]


def _parity_cases():
    """Every option combination for the ``everywhere`` implementations; the main options for default and fused."""
    for algorithm in ALGORITHMS:
        for option_sets, implementations in ((algorithm.options, algorithm.everywhere),
                                             (algorithm.main, ("default", "fused"))):
            for kwargs in option_sets:
                for implementation in implementations:
                    for dtype in DTYPES:
                        yield algorithm.name, kwargs, implementation, dtype


@pytest.mark.parametrize("name,kwargs,implementation,dtype", _params(_parity_cases()))
def test_matches_torch(name, kwargs, implementation, dtype):
    ours, theirs, _, _ = run(name, kwargs, implementation, dtype)
    assert_same_trajectory(ours, theirs, dtype)


def _group_cases():
    """The first main option set; every implementation except a compiled fused (default's graphs)."""
    for algorithm in ALGORITHMS:
        for implementation in IMPLEMENTATIONS:
            if implementation != "fused" or not algorithm.compiled:
                yield algorithm.name, implementation


def _both_or(which: int):
    """Both main option sets where nothing compiles; only the given one where graphs would compile."""
    return lambda algorithm: (0, 1) if not algorithm.compiled else (which,)


@pytest.mark.parametrize("name,implementation", _params(_group_cases()))
def test_param_groups_missing_grads_and_schedules(name, implementation):
    """Per-group overrides, parameters without gradients on some steps, and (where the row says so)
    hyper-parameters changed before every step.

    With skipped steps, parameters of one bucket sit at different step counts, start their state under
    different learning rates (Rprop's ``step_size``), carry an ``eta`` computed under different
    learning rates (ASGD) and ``mu_product``s taken over different ``beta1``s (NAdam), which the base
    must keep apart.
    """
    algorithm = BY_NAME[name]
    kwargs = algorithm.main[0]
    ours, theirs, our_opt, their_opt = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(groups(name, ps), **kwargs, **OUR_FLAGS[implementation]),
        lambda ps: getattr(torch.optim, name)(groups(name, ps), **kwargs, foreach=False),
        skip=skip,
        between=(lambda step, a, b: schedule(step, a, b)) if algorithm.scheduled else None,
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert torch.equal(ours[1], make_params()[1]), "a parameter without gradients must not move"
    assert_same_state(our_opt.state_dict(), their_opt.state_dict())


@pytest.mark.parametrize("name", [algorithm.name for algorithm in ALGORITHMS])
def test_add_param_group_midrun(name):
    kwargs = BY_NAME[name].main[0]

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
    assert_same_state(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch", "ours->ours"])
@pytest.mark.parametrize("name,which", _params(
    (algorithm.name, which) for algorithm in ALGORITHMS for which in _both_or(1)(algorithm)))
def test_state_dict_round_trip_then_continue(name, which, direction):
    """Half the steps in one optimizer, the rest in a fresh one loaded from its state dict.

    Where the lr changes every step, ASGD's saved ``eta`` (computed under the previous lr) matters.
    """
    algorithm = BY_NAME[name]
    kwargs = algorithm.main[which]
    make = {"ours": lambda ps: getattr(shardoptim, name)(groups(name, ps), **kwargs),
            "torch": lambda ps: getattr(torch.optim, name)(groups(name, ps), **kwargs, foreach=False)}
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
            if skip(step, i):
                p.grad = r.grad = None
        opt.step()
        reference_opt.step()
        if algorithm.scheduled:
            schedule(step, opt, reference_opt)
    assert_same_trajectory(params, reference, torch.float32)
    assert_same_state(opt.state_dict(), reference_opt.state_dict())


def _complex_cases():
    """complex64 is one more graph for a compiled default: the first main option set only there."""
    for algorithm in ALGORITHMS:
        for which in _both_or(0)(algorithm):
            for implementation in ("default", "foreach", "for-loop"):
                yield algorithm.name, which, implementation


@pytest.mark.parametrize("name,which,implementation", _params(_complex_cases()))
def test_complex_parameters_match_torch(name, which, implementation):
    kwargs = BY_NAME[name].main[which]
    ours, theirs, our_opt, their_opt = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, **kwargs, **OUR_FLAGS[implementation]),
        lambda ps: getattr(torch.optim, name)(ps, **kwargs, foreach=False),
        dtype=torch.complex64,
    )
    assert_same_trajectory(ours, theirs, torch.complex64)
    assert_same_state(our_opt.state_dict(), their_opt.state_dict())


def _tensor_lr_cases():
    """Every implementation except a compiled fused (default's graph)."""
    for algorithm in ALGORITHMS:
        for which in _both_or(0)(algorithm):
            for implementation in IMPLEMENTATIONS:
                if implementation != "fused" or not algorithm.compiled:
                    yield algorithm.name, which, implementation


@pytest.mark.parametrize("name,which,implementation", _params(_tensor_lr_cases()))
def test_tensor_learning_rate(name, which, implementation):
    kwargs = {k: v for k, v in BY_NAME[name].main[which].items() if k != "lr"}
    if name in ("Adam", "AdamW") and implementation == "foreach":
        # torch's Adam refuses a tensor lr with foreach=True unless capturable: so must we.
        for module in (torch.optim, shardoptim):
            with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
                getattr(module, name)(make_params(), lr=torch.tensor(0.01), **kwargs, foreach=True)
        return
    ours, theirs, our_opt, _ = run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, lr=torch.tensor(0.01), **kwargs, **OUR_FLAGS[implementation]),
        lambda ps: getattr(torch.optim, name)(ps, lr=torch.tensor(0.01), **kwargs, foreach=False),
    )
    assert_same_trajectory(ours, theirs, torch.float32)
    assert isinstance(our_opt.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_update_never_recompiles(name):
    """After the first step, new learning rates, betas and momenta (ASGD's eta and mu across t0, RAdam's
    switch to the rectified step around step 6) all reuse the same graph."""
    ours = make_params()
    opt = getattr(shardoptim, name)(ours, **BY_NAME[name].main[0])

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
                schedule(i, opt)
                step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert all(torch.isfinite(p).all() for p in ours)


@pytest.mark.parametrize("name", [algorithm.name for algorithm in ALGORITHMS])
def test_state_is_torch_shaped(name):
    """Every state entry has torch's key, shape and dtype: 0-D ``step``/``mu_product``/``eta``/``mu``,
    per-element others."""
    _, _, ours, theirs = run(name, BY_NAME[name].main[0], "foreach", steps=3)
    for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        assert ours.state[p].keys() == theirs.state[q].keys()
        for key, value in theirs.state[q].items():
            assert ours.state[p][key].shape == value.shape, key
            assert ours.state[p][key].dtype == value.dtype, key


NAMES = [algorithm.name for algorithm in ALGORITHMS]
INVALID = [
    *[(name, dict(lr=-1.0)) for name in NAMES],
    *[(name, dict(lr=torch.tensor([0.1, 0.2]))) for name in NAMES],
    *[(name, dict(weight_decay=-0.1)) for name in NAMES if name != "Rprop"],
    *[(name, dict(eps=-1.0)) for name in NAMES if name not in ("SGD", "ASGD", "Rprop")],
    *[(name, dict(betas=betas)) for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam")
      for betas in ((1.0, 0.9), (0.9, -0.1), (1.5, 0.9))],
    *[(name, dict(fused=True, foreach=True)) for name in ("SGD", "Adam", "AdamW", "Adagrad")],
    ("SGD", dict(weight_decay=-1.0)), ("AdamW", dict(lr=-0.1)),
    ("SGD", dict(momentum=-0.5)), ("SGD", dict(nesterov=True)), ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1)),
    ("Adadelta", dict(rho=1.5)), ("Adadelta", dict(rho=-0.1)),
    ("Adagrad", dict(lr_decay=-0.1)), ("Adagrad", dict(initial_accumulator_value=-0.1)),
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
    if "fused" not in kwargs:
        with pytest.raises(theirs.type, match=re.escape(str(theirs.value))):
            getattr(shardoptim, name)([{"params": make_params()[:2]}, {"params": make_params()[2:], **kwargs}])


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_options_name_the_option(name):
    if "capturable" in inspect.signature(getattr(torch.optim, name)).parameters:
        with pytest.raises(ValueError, match="capturable"):
            getattr(shardoptim, name)(make_params(), capturable=True)
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
    assert {arg for arg in ours if arg not in theirs} == (
        {"fused", "process_group", "reduce_grads", "sharding", "state_dtype"} - set(theirs)
    )


def test_shapes_cover_alignment_edge_cases():
    assert any(len(shape) == 0 for shape in SHAPES) and any(
        shape and torch.Size(shape).numel() % 16 for shape in SHAPES
    )
