"""Running shardoptim and torch.optim side by side on identical parameters and gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: A mix of shapes: matrices, vectors, a scalar, sizes that are not multiples of the alignment.
SHAPES: tuple[tuple[int, ...], ...] = ((7, 5), (5,), (3, 4, 2), (), (33,))

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def make_params(
    dtype: torch.dtype = torch.float32, shapes: Sequence[tuple[int, ...]] = SHAPES, seed: int = 0
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape in shapes]


def synthetic_grad(param: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A gradient that depends on the parameter (so errors compound) plus seeded noise."""
    noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
    return 0.5 * param.detach() + noise


def run_side_by_side(
    ours: Factory,
    theirs: Factory,
    *,
    steps: int = 50,
    dtype: torch.dtype = torch.float32,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    skip: Callable[[int, int], bool] = lambda step, index: False,
    between: Callable[[int, torch.optim.Optimizer, torch.optim.Optimizer], None] | None = None,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.optim.Optimizer, torch.optim.Optimizer]:
    """Step both optimizers ``steps`` times on equal parameters and gradients.

    ``skip(step, i)`` leaves parameter ``i`` without a gradient at ``step``; ``between`` runs after
    each step (to change hyper-parameters, round-trip state dicts, ...).
    """
    our_params, their_params = make_params(dtype, shapes, seed), make_params(dtype, shapes, seed)
    our_opt, their_opt = ours(our_params), theirs(their_params)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for i, (a, b) in enumerate(zip(our_params, their_params)):
            grad = synthetic_grad(b, gen)
            if skip(step, i):
                a.grad = b.grad = None
            else:
                a.grad, b.grad = grad.clone(), grad.clone()
        our_opt.step()
        their_opt.step()
        if between is not None:
            between(step, our_opt, their_opt)
    return our_params, their_params, our_opt, their_opt


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """torch's own optimizer-test tolerances for 50-step trajectories."""
    if dtype in (torch.float64, torch.complex128):
        return {"atol": 1e-9, "rtol": 1e-7}
    return {"atol": 1e-5, "rtol": 1.3e-6}


def assert_same_trajectory(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a.detach(), b.detach(), **tolerance(dtype), msg=lambda m: f"param {i}: {m}")


def assert_same_state(ours: dict, theirs: dict) -> None:
    """Equal state dicts: the same keys, shapes and values per parameter, and the same param groups."""
    assert ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        assert ours["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            assert ours["state"][index][key].shape == value.shape, (index, key)
            torch.testing.assert_close(ours["state"][index][key], value, atol=1e-5, rtol=1e-5)
    flags = ("foreach", "fused")  # which implementation ran may differ by design (torch may have no fused)
    for ours_group, their_group in zip(ours["param_groups"], theirs["param_groups"]):
        assert {k: v for k, v in ours_group.items() if k not in flags} == {
            k: v for k, v in their_group.items() if k not in flags
        }
