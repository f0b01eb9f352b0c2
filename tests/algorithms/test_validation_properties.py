"""Property-based: over the hyper-parameter space, every algorithm rejects exactly what torch.optim
rejects (same exception type and message) and accepts what it accepts; per-group overrides are
rejected with the same error, where torch does not look."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardoptim

NAMES = ["SGD", "Adam", "AdamW", "Adadelta", "Adagrad", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop",
         "SparseAdam", "LBFGS"]

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-12, -1e-12, 0.999999, 1.0000001, 2.0]),
    st.integers(-3, 3),
)
PAIRS = st.tuples(NUMBERS, NUMBERS)

#: The arguments of each algorithm that torch checks, and a strategy for each.
SPACE = {
    "lr": NUMBERS, "eps": NUMBERS, "weight_decay": NUMBERS, "momentum": NUMBERS, "dampening": NUMBERS,
    "rho": NUMBERS, "lr_decay": NUMBERS, "initial_accumulator_value": NUMBERS, "alpha": NUMBERS,
    "momentum_decay": NUMBERS, "betas": PAIRS, "etas": PAIRS, "step_sizes": PAIRS, "lambd": NUMBERS,
    "t0": NUMBERS, "nesterov": st.booleans(), "centered": st.booleans(), "amsgrad": st.booleans(),
    "maximize": st.booleans(), "history_size": st.integers(-2, 5), "max_iter": st.integers(-2, 5),
}


def arguments(name: str) -> list[str]:
    signature = inspect.signature(getattr(torch.optim, name))
    return [arg for arg in signature.parameters if arg in SPACE]


def outcome(cls, kwargs, params):
    """The exception a constructor raises (type and message), or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cls(params, **kwargs)
        except Exception as error:  # noqa: BLE001 - compared with torch's
            return type(error), str(error)
    return None


def same_message(ours: str, theirs: str) -> bool:
    # Ours may say more after torch's words (which group, which rank); torch's text comes first.
    return ours.startswith(theirs) or ours == theirs


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_constructor_accepts_and_rejects_like_torch(name, data):
    chosen = data.draw(st.lists(st.sampled_from(arguments(name)), unique=True, max_size=4))
    kwargs = {arg: data.draw(SPACE[arg], label=arg) for arg in chosen}
    theirs = outcome(getattr(torch.optim, name), kwargs, [torch.nn.Parameter(torch.ones(2))])
    ours = outcome(getattr(shardoptim, name), kwargs, [torch.nn.Parameter(torch.ones(2))])
    if theirs is None:
        assert ours is None, f"{name}({kwargs}): torch accepts, ours raised {ours}"
    else:
        assert ours is not None, f"{name}({kwargs}): torch raised {theirs}, ours accepted"
        assert ours[0] is theirs[0] and same_message(ours[1], theirs[1]), f"{name}({kwargs}): {ours} vs {theirs}"


@pytest.mark.parametrize("name", [n for n in NAMES if n != "LBFGS"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_a_per_group_override_is_rejected_as_the_constructor_rejects_it(name, data):
    arg = data.draw(st.sampled_from(arguments(name)))
    value = data.draw(SPACE[arg])
    as_argument = outcome(getattr(shardoptim, name), {arg: value}, [torch.nn.Parameter(torch.ones(2))])
    as_override = outcome(
        getattr(shardoptim, name), {}, [{"params": [torch.nn.Parameter(torch.ones(2))], arg: value}]
    )
    if as_argument is None:
        assert as_override is None
    else:
        assert as_override is not None and as_override[0] is as_argument[0], (arg, value, as_argument, as_override)


def test_invalid_values_are_named_in_the_message():
    for kwargs, text in (({"lr": -1}, "-1"), ({"betas": (0.5, math.nan)}, "nan"), ({"eps": -1e-3}, "-0.001")):
        with pytest.raises(ValueError, match=text):
            shardoptim.Adam([torch.nn.Parameter(torch.ones(2))], **kwargs)
