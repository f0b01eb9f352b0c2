"""The one table of elementwise algorithms that drives the generic tests in ``test_parity.py``.

Each row names an algorithm, every option combination tested against torch, two main option sets
(the ones the compiled implementations run, and the ones the group, state-dict, complex and
tensor-lr tests use), and which torch implementation each of ours is compared with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

import shardoptim
from tests.oracle import run_side_by_side

#: Our implementation flag -> the constructor flags that select it.
OUR_FLAGS = {"default": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
IMPLEMENTATIONS = tuple(OUR_FLAGS)
DTYPES = (torch.float32, torch.float64)


def options(**choices) -> Iterator[dict]:
    """Every combination of the given keyword values."""
    keys = list(choices)
    for values in itertools.product(*choices.values()):
        yield dict(zip(keys, values))


@dataclass(frozen=True)
class Algorithm:
    name: str
    #: Every option combination compared with torch by the ``everywhere`` implementations.
    options: tuple[dict, ...]
    #: The main options: run by default and fused (the only ones these run where they compile: one more
    #: graph, ~4 s, per distinct set of flags and constant hyper-parameters, and torch.compile allows 8
    #: per update), and the ones the param-group, state-dict, complex and tensor-lr tests use.
    main: tuple[dict, dict]
    #: What a second param group overrides besides its lr.
    overrides: dict
    #: Whether default and fused compile our update (torch has no fused kernel for these); otherwise
    #: fused is compared with torch's fused kernel.
    compiled: bool
    #: The implementations run on every option combination.
    everywhere: tuple[str, ...] = ("for-loop", "foreach")
    #: Whether the param-group and state-dict tests change hyper-parameters before every step.
    scheduled: bool = True
    #: Whether torch's foreach implementation is the reference for ours. torch's foreach ASGD
    #: rearranges the arithmetic (it differs from torch's own for-loop by ~1e-6 in float32, more than
    #: float64's tolerance); our update is written once, in the form of torch's for-loop.
    torch_foreach: bool = True

    def torch_flags(self, implementation: str) -> dict:
        """torch's implementation ours is compared with."""
        if implementation == "foreach" and self.torch_foreach:
            return {"foreach": True}
        if implementation == "fused" and not self.compiled:
            return {"fused": True}
        return {"foreach": False}


def _sgd_options():
    for kw in options(momentum=(0.0, 0.9), dampening=(0.0, 0.2), nesterov=(False, True), weight_decay=(0.0, 0.1),
                      maximize=(False, True)):
        if kw["nesterov"] and (kw["momentum"] == 0 or kw["dampening"] != 0):
            continue
        if kw["momentum"] == 0 and kw["dampening"] != 0:
            continue
        yield dict(lr=0.05, **kw)


def _adam_options(decoupled_flag: bool):
    for kw in options(amsgrad=(False, True), maximize=(False, True), weight_decay=(0.0, 0.1)):
        base = dict(lr=0.01, betas=(0.8, 0.99), **kw)
        yield base
        if decoupled_flag:
            yield {**base, "decoupled_weight_decay": True}


ALGORITHMS = (
    Algorithm(
        "SGD", tuple(_sgd_options()),
        main=(dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
        overrides=dict(weight_decay=0.2), compiled=False, scheduled=False, everywhere=IMPLEMENTATIONS,
    ),
    Algorithm(
        "Adam", tuple(_adam_options(decoupled_flag=True)),
        main=(dict(lr=0.01), dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
        overrides=dict(weight_decay=0.2), compiled=False, scheduled=False, everywhere=IMPLEMENTATIONS,
    ),
    Algorithm(
        "AdamW", tuple(_adam_options(decoupled_flag=False)),
        main=(dict(lr=0.01, amsgrad=True), dict(lr=0.01)),
        overrides=dict(weight_decay=0.2), compiled=False, scheduled=False, everywhere=IMPLEMENTATIONS,
    ),
    Algorithm(
        "Adadelta",
        tuple(dict(lr=0.5, **kw) for kw in options(rho=(0.9, 0.6), weight_decay=(0.0, 0.1), maximize=(False, True))),
        main=(dict(lr=0.5), dict(lr=0.5, rho=0.6, weight_decay=0.1, maximize=True)),
        overrides=dict(weight_decay=0.2, rho=0.7), compiled=True,
    ),
    Algorithm(
        "Adagrad",
        tuple(dict(lr=0.05, **kw) for kw in options(
            lr_decay=(0.0, 0.01), weight_decay=(0.0, 0.1), initial_accumulator_value=(0.0, 0.1),
            maximize=(False, True))),
        main=(dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1), dict(lr=0.05, weight_decay=0.1, maximize=True)),
        overrides=dict(weight_decay=0.2, lr_decay=0.05), compiled=False,
        everywhere=("for-loop", "foreach", "fused"),
    ),
    Algorithm(
        "Adamax",
        tuple(dict(lr=0.01, betas=(0.8, 0.99), **kw) for kw in options(weight_decay=(0.0, 0.1), maximize=(False, True))),
        main=(dict(lr=0.01), dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True)),
        overrides=dict(weight_decay=0.2, betas=(0.7, 0.95)), compiled=True,
    ),
    Algorithm(
        "ASGD",
        tuple(dict(lr=0.05, **kw) for kw in options(
            lambd=(1e-4, 0.02), t0=(1e6, 10.0), weight_decay=(0.0, 0.1), maximize=(False, True))),
        main=(dict(lr=0.05, lambd=0.02, t0=10.0), dict(lr=0.05, lambd=0.02, t0=10.0, weight_decay=0.1, maximize=True)),
        overrides=dict(weight_decay=0.2, lambd=0.01, t0=5.0, alpha=0.6), compiled=True, torch_foreach=False,
    ),
    Algorithm(
        "NAdam",
        tuple(dict(lr=0.01, betas=(0.8, 0.99), **kw) for kw in options(
            weight_decay=(0.0, 0.1), decoupled_weight_decay=(False, True), momentum_decay=(4e-3, 0.02),
            maximize=(False, True))),
        main=(dict(lr=0.01, betas=(0.8, 0.99)),
              dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=0.02, maximize=True)),
        overrides=dict(weight_decay=0.2, betas=(0.7, 0.95), momentum_decay=0.01), compiled=True,
    ),
    Algorithm(
        "RAdam",
        tuple(dict(lr=0.01, **kw) for kw in options(
            betas=((0.9, 0.999), (0.8, 0.99)), weight_decay=(0.0, 0.1), decoupled_weight_decay=(False, True),
            maximize=(False, True))),
        main=(dict(lr=0.01), dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, maximize=True)),
        overrides=dict(weight_decay=0.2, betas=(0.7, 0.95), decoupled_weight_decay=True), compiled=True,
    ),
    Algorithm(
        "RMSprop",
        tuple(dict(lr=0.01, **kw) for kw in options(
            momentum=(0.0, 0.9), centered=(False, True), weight_decay=(0.0, 0.1), maximize=(False, True)))
        + (dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True),),
        main=(dict(lr=0.01, momentum=0.9, centered=True), dict(lr=0.01, alpha=0.9, weight_decay=0.1, maximize=True)),
        overrides=dict(weight_decay=0.2, alpha=0.9, momentum=0.0, centered=False), compiled=True,
    ),
    Algorithm(
        "Rprop",
        tuple(dict(lr=0.01, **kw) for kw in options(
            etas=((0.5, 1.2), (0.3, 1.7)), step_sizes=((1e-6, 50), (1e-3, 0.05)), maximize=(False, True))),
        main=(dict(lr=0.01), dict(lr=0.01, etas=(0.3, 1.7), step_sizes=(1e-3, 0.05), maximize=True)),
        overrides=dict(etas=(0.4, 1.5), step_sizes=(1e-4, 1.0)), compiled=True,
    ),
)

BY_NAME = {algorithm.name: algorithm for algorithm in ALGORITHMS}
COMPILED = tuple(algorithm.name for algorithm in ALGORITHMS if algorithm.compiled)


def groups(name: str, params: list) -> list[dict]:
    """Three param groups; the second overrides the lr and the algorithm's ``overrides``."""
    return [{"params": params[:2]}, {"params": params[2:4], "lr": 0.003, **BY_NAME[name].overrides},
            {"params": params[4:]}]


def skip(step: int, i: int) -> bool:
    """Parameter 1 never has a gradient; 3 skips every third step; 0 skips the first four."""
    return i == 1 or (i == 3 and step % 3 == 0) or (i == 0 and step < 4)


def schedule(step: int, *optimizers: torch.optim.Optimizer) -> None:
    """What schedulers do between steps: a new lr, and a cycled beta1 or momentum (CyclicLR, OneCycleLR)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * 0.95
            if "betas" in group:
                group["betas"] = (group["betas"][0] * 0.99, group["betas"][1])
            if group.get("momentum", 0) > 0:
                group["momentum"] = 0.5 + 0.4 * math.cos(step)


def case_id(name: str, kwargs: dict) -> str:
    return name + "-" + ",".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr")


def run(name: str, kwargs: dict, implementation: str, dtype: torch.dtype = torch.float32, **harness):
    """``run_side_by_side`` for one row of the table: our implementation against torch's reference for it."""
    algorithm = BY_NAME[name]
    return run_side_by_side(
        lambda ps: getattr(shardoptim, name)(ps, **kwargs, **OUR_FLAGS[implementation]),
        lambda ps: getattr(torch.optim, name)(ps, **kwargs, **algorithm.torch_flags(implementation)),
        dtype=dtype,
        **harness,
    )
