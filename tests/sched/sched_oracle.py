"""torch.optim.lr_scheduler as the oracle: the case table and the side-by-side driver.

Every case is built twice, once from ``shardoptim.sched`` and once from
``torch.optim.lr_scheduler``, each on its own copy of the same optimizer; both are stepped and
every group's lr (and momentum / beta1) is compared after every epoch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

RTOL = 1e-12
EPOCHS = 200
MIDWAY = 100


def decay_by_epoch(epoch: int) -> float:
    return 0.95**epoch


def inverse_epoch(epoch: int) -> float:
    return 1.0 / (1 + epoch)


def tenth_every_ten(epoch: int) -> float:
    return 0.9 ** (epoch // 10)


def constant_shrink(epoch: int) -> float:
    return 0.97


def shrink_every_third(epoch: int) -> float:
    return 1.0 if epoch % 3 else 0.9


def halve_per_unit(x: float) -> float:
    return 0.5**x


@dataclass(frozen=True)
class Case:
    """One scheduler class with one set of keyword arguments, on one kind of optimizer."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam" (betas)

    def make(self, lib: Any, optimizer: Any) -> Any:
        return getattr(lib, self.name)(optimizer, **self.kwargs)

    @property
    def id(self) -> str:
        def show(value: Any) -> str:
            if isinstance(value, list):
                return "[" + ",".join(show(v) for v in value) + "]"
            return getattr(value, "__name__", repr(value))

        args = ",".join(f"{k}={show(v)}" for k, v in self.kwargs.items())
        return f"{self.name}[{self.optimizer}:{args}]"


CASES = [
    Case("LambdaLR", {"lr_lambda": decay_by_epoch}),
    Case("LambdaLR", {"lr_lambda": [inverse_epoch, tenth_every_ten]}),
    Case("MultiplicativeLR", {"lr_lambda": constant_shrink}),
    Case("MultiplicativeLR", {"lr_lambda": [constant_shrink, shrink_every_third]}),
    Case("StepLR", {"step_size": 7, "gamma": 0.5}),
    Case("StepLR", {"step_size": 30}),
    Case("MultiStepLR", {"milestones": [10, 40, 40, 120], "gamma": 0.5}),
    Case("MultiStepLR", {"milestones": [150, 0, 30], "gamma": 0.3}),
    Case("ConstantLR", {}),
    Case("ConstantLR", {"factor": 0.5, "total_iters": 40}),
    Case("LinearLR", {}),
    Case("LinearLR", {"start_factor": 0.05, "total_iters": 40}),
    Case("LinearLR", {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 100}),
    Case("LinearLR", {"start_factor": 0.5, "end_factor": 0.1, "total_iters": 199}),
    Case("ExponentialLR", {"gamma": 0.97}),
    Case("ExponentialLR", {"gamma": 1.01}),
    Case("PolynomialLR", {}),
    Case("PolynomialLR", {"total_iters": 150, "power": 2.0}),
    Case("PolynomialLR", {"total_iters": 60, "power": 0.5}),
    Case("CosineAnnealingLR", {"T_max": 50}),
    Case("CosineAnnealingLR", {"T_max": 10, "eta_min": 0.01}),
    Case("CosineAnnealingLR", {"T_max": 37, "eta_min": 0.05}),
    Case("CosineAnnealingLR", {"T_max": 200, "eta_min": 1e-3}),
    Case("CyclicLR", {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 10}),
    Case(
        "CyclicLR",
        {"base_lr": [0.01, 0.002], "max_lr": [0.1, 0.05], "step_size_up": 7, "step_size_down": 13,
         "mode": "triangular2", "base_momentum": [0.8, 0.7], "max_momentum": 0.95},
    ),
    Case("CyclicLR", {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 5, "mode": "exp_range", "gamma": 0.99},
         optimizer="adam"),
    Case("CyclicLR", {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 9, "cycle_momentum": False}),
    Case("CyclicLR", {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 6, "scale_fn": halve_per_unit,
                      "scale_mode": "iterations"}),
    Case("OneCycleLR", {"max_lr": 0.5, "total_steps": 250}),
    Case("OneCycleLR", {"max_lr": [0.5, 0.2], "epochs": 25, "steps_per_epoch": 10, "three_phase": True,
                        "anneal_strategy": "linear"}, optimizer="adam"),
    Case("OneCycleLR", {"max_lr": 0.3, "total_steps": 230, "pct_start": 0.1, "cycle_momentum": False,
                        "div_factor": 10.0, "final_div_factor": 100.0}),
    Case("OneCycleLR", {"max_lr": 0.3, "total_steps": 260, "base_momentum": 0.8, "max_momentum": [0.9, 0.99],
                        "three_phase": True}, optimizer="adam"),
    Case("CosineAnnealingWarmRestarts", {"T_0": 10}),
    Case("CosineAnnealingWarmRestarts", {"T_0": 7, "T_mult": 2, "eta_min": 0.001}),
]


def make_optimizer(kind: str = "sgd", lr: Callable[[float], Any] = float) -> torch.optim.Optimizer:
    """Two tiny parameters in two groups with different lrs; ``lr`` wraps each lr value."""
    first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [first], "lr": lr(0.1)}, {"params": [second], "lr": lr(0.03)}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=0.1, betas=(0.9, 0.999))
    raise ValueError(kind)


# A layout puts a case's scheduler on an optimizer: alone, or with others. It returns the
# schedulers to step each epoch, in order. ``lib`` is ``ours`` or torch's module.
def alone(lib: Any, opt: Any, case: Case) -> list[Any]:
    return [case.make(lib, opt)]


def chained_before(lib: Any, opt: Any, case: Case) -> list[Any]:
    """The case first, then a chainable partner on the same optimizer, stepped back to back."""
    return [case.make(lib, opt), lib.ExponentialLR(opt, gamma=0.98)]


def chained_after(lib: Any, opt: Any, case: Case) -> list[Any]:
    return [lib.MultiStepLR(opt, milestones=[15, 70, 140], gamma=0.5), case.make(lib, opt)]


def sequential_into(lib: Any, opt: Any, case: Case) -> list[Any]:
    warmup = lib.LinearLR(opt, start_factor=0.25, total_iters=8)
    return [lib.SequentialLR(opt, [warmup, case.make(lib, opt)], milestones=[12])]


def sequential_from(lib: Any, opt: Any, case: Case) -> list[Any]:
    return [lib.SequentialLR(opt, [case.make(lib, opt), lib.ExponentialLR(opt, gamma=0.98)], milestones=[100])]


def chained_scheduler(lib: Any, opt: Any, case: Case) -> list[Any]:
    partner = lib.StepLR(opt, step_size=25, gamma=0.7)
    return [lib.ChainedScheduler([case.make(lib, opt), partner])]


LAYOUTS = [alone, chained_before, chained_after, sequential_into, sequential_from, chained_scheduler]


def _close(a: Any, b: Any) -> bool:
    return math.isclose(float(a), float(b), rel_tol=RTOL, abs_tol=0.0)


def assert_same_groups(mine: Any, ref: Any, where: str) -> None:
    """Every group's lr, initial_lr, momentum and beta1 agree to ``RTOL``."""
    assert len(mine.param_groups) == len(ref.param_groups)
    for index, (g, r) in enumerate(zip(mine.param_groups, ref.param_groups, strict=True)):
        for key in ("lr", "initial_lr", "momentum", "max_lr", "min_lr"):
            if key in r:
                assert _close(g[key], r[key]), f"{where}: group {index} {key} {g[key]!r} != torch {r[key]!r}"
        if "betas" in r:
            assert _close(g["betas"][0], r["betas"][0]), f"{where}: group {index} beta1 {g['betas']} != {r['betas']}"
            assert g["betas"][1] == r["betas"][1]


def assert_same_schedulers(mine: list[Any], ref: list[Any], where: str) -> None:
    for m, r in zip(mine, ref, strict=True):
        assert hasattr(m, "last_epoch") == hasattr(r, "last_epoch")
        assert getattr(m, "last_epoch", None) == getattr(r, "last_epoch", None), f"{where}: last_epoch differs"
        got, want = m.get_last_lr(), r.get_last_lr()
        assert all(_close(a, b) for a, b in zip(got, want, strict=True)), f"{where}: get_last_lr {got} != torch {want}"


def step_both(mine: tuple[Any, list[Any]], ref: tuple[Any, list[Any]], epochs: range) -> None:
    """Step (optimizer, schedulers) pairs side by side, comparing after every epoch.

    The optimizers step once, first: enough to order them before the schedulers (no warning),
    and most of the run time otherwise; the schedulers never read parameters.
    """
    for opt, _ in (mine, ref):
        opt.step()
    for epoch in epochs:
        for _, schedulers in (mine, ref):
            for scheduler in schedulers:
                scheduler.step()
        assert_same_groups(mine[0], ref[0], f"epoch {epoch}")
        assert_same_schedulers(mine[1], ref[1], f"epoch {epoch}")


def json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state))

