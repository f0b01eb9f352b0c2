"""The two sides of every client test, and how they are compared.

``ORACLE`` is torch.optim with torch.optim.lr_scheduler; ``candidate()`` is shardoptim with
shardoptim.sched, or, set by ``SHARDOPTIM_CLIENTS_CANDIDATE``, torch again to check the tests
themselves: ``torch`` (a test that fails then is wrong, not shardoptim) or ``torch-fused`` (torch's
fused CPU kernels, which differ from its for-loop by rounding only: how far that carries through a
training run is what ``TOLERANCE`` must allow).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import torch

#: Tolerance for the candidate against torch.optim after a few dozen steps of real training.
#: Not bit-identical by design: torch.optim's CPU default is its for-loop, ours runs a fused or
#: compiled kernel over one flat buffer, so an update may differ by an ulp, and the training
#: (forward, backward, clipping, schedule) carries that into the next steps. Measured with
#: ``SHARDOPTIM_CLIENTS_CANDIDATE=torch-fused`` (torch's fused CPU AdamW against its for-loop) on
#: the Lightning and accelerate runs here: at most 1.2e-7 apart on the parameters (of magnitude
#: <= 1.1) and 6e-8 on the losses. These bounds are ~10x that, and ~1000x below what a missed
#: step, a wrong lr or a skipped clipping does here (1e-3 and more: the lrs are 1e-2).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}

#: A resume compared with the uninterrupted run of the same optimizer: torch.optim resumes bit for
#: bit in all three clients, and DESIGN.md asks the same of shardoptim at the same world size.
EXACT = {"rtol": 0.0, "atol": 0.0}


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: an optimizer namespace and a scheduler namespace."""

    name: str
    optim: ModuleType | SimpleNamespace
    sched: ModuleType
    #: The package the optimizer's and scheduler's classes come from.
    package: str

    def assert_drove(self, optimizer: object, scheduler: object | None = None) -> None:
        """The client stepped this arm's optimizer (and scheduler), not one it made itself.

        Unwraps the clients' wrappers: LightningOptimizer and AcceleratedOptimizer keep the wrapped
        optimizer as ``.optimizer``, AcceleratedScheduler the wrapped scheduler as ``.scheduler``.
        """
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        assert type(optimizer).__module__.startswith(self.package), type(optimizer)
        if scheduler is not None:
            scheduler = getattr(scheduler, "scheduler", scheduler)
            assert type(scheduler).__module__.startswith(self.package), type(scheduler)


ORACLE = Arm("torch.optim", torch.optim, torch.optim.lr_scheduler, "torch.optim")


def candidate() -> Arm:
    """shardoptim, unless SHARDOPTIM_CLIENTS_CANDIDATE asks for torch (see the module's docstring)."""
    choice = os.environ.get("SHARDOPTIM_CLIENTS_CANDIDATE", "shardoptim")
    if choice == "torch":
        return Arm("torch.optim as candidate", torch.optim, torch.optim.lr_scheduler, "torch.optim")
    if choice == "torch-fused":
        fused = SimpleNamespace(
            **{name: functools.partial(getattr(torch.optim, name), fused=True) for name in ("SGD", "Adam", "AdamW")}
        )
        return Arm("torch.optim fused as candidate", fused, torch.optim.lr_scheduler, "torch.optim")
    if choice != "shardoptim":
        raise ValueError(f"SHARDOPTIM_CLIENTS_CANDIDATE={choice!r}: expected shardoptim, torch or torch-fused")
    import shardoptim
    import shardoptim.sched

    return Arm("shardoptim", shardoptim, shardoptim.sched, "shardoptim")


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tolerance) -> None:
    """Same names, and each tensor close to the expected one (message names the tensor)."""
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], **tolerance, msg=lambda m, name=name: f"{name}: {m}"
        )
