"""LBFGS and SparseAdam: shardoptim against torch.optim, interleaved in one process.

Run from the repository root::

    python -m bench.lbfgs_sparse_adam                 # about a minute on 2 cores
    python -m bench.lbfgs_sparse_adam --reps 15 --threads 2

LBFGS: one ``step(closure)`` of ``max_iter=10`` iterations, with a fixed step and with the strong-Wolfe
line search, under two closures: a cheap quadratic of 4.2M parameters in 200 tensors (so the
optimizer's own work shows: gathering gradients, moving parameters, copies for the line search) and
an MLP's forward and backward (1.05M parameters in 4 tensors). SparseAdam: one ``step()`` on a
500k x 64 ``nn.Embedding(sparse=True)`` whose gradient touches the rows of 8192 x 4 random ids. Each round runs ours and torch's
on identical copies, alternating which goes first (an LBFGS step starts from the same parameters and
empty state every round, reset untimed); the table shows medians and ours / torch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

import shardoptim


#: A timed call and the untimed reset before it (back to the same starting point every round).
Case = tuple[Callable[[], object], Callable[[], object]]


def _time(case: Case) -> float:
    run, reset = case
    reset()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved(ours: Case, theirs: Case, reps: int) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``theirs`` over ``reps`` rounds after one warm-up each."""
    _time(ours), _time(theirs)
    a, b = [], []
    for rep in range(reps):
        if rep % 2:
            b.append(_time(theirs))
            a.append(_time(ours))
        else:
            a.append(_time(ours))
            b.append(_time(theirs))
    return statistics.median(a), statistics.median(b)


def lbfgs_case(closure_kind: str, line_search_fn: str | None) -> tuple[Case, Case]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(21000,)] * 200  # 4.2M parameters in 200 tensors
    if closure_kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.Tanh(), torch.nn.Linear(2048, 1))
        x, y = torch.randn(256, 512, generator=gen), torch.randn(256, 1, generator=gen)
    targets = [torch.randn(s, generator=gen) for s in shapes]
    steps = []
    for cls in (shardoptim.LBFGS, torch.optim.LBFGS):
        if closure_kind == "mlp":
            net = copy.deepcopy(model)
            params = list(net.parameters())
        else:
            params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = cls(params, lr=0.5 if line_search_fn is None else 1, max_iter=10, line_search_fn=line_search_fn,
                  history_size=10, tolerance_grad=0, tolerance_change=0)

        def closure(opt=opt, params=params, net=net if closure_kind == "mlp" else None):
            opt.zero_grad()
            if net is not None:
                loss = torch.nn.functional.mse_loss(net(x), y)
            else:
                loss = sum(0.5 * (p - t).square().sum() * (1 + i % 3) for i, (p, t) in enumerate(zip(params, targets)))
            loss.backward()
            return loss

        start = [p.detach().clone() for p in params]

        def reset(opt=opt, params=params, start=start):
            opt.state.clear()
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)

        steps.append((lambda opt=opt, closure=closure: opt.step(closure), reset))
    return steps[0], steps[1]


def sparse_adam_case() -> tuple[Case, Case]:
    gen = torch.Generator().manual_seed(0)
    embedding = torch.nn.Embedding(500_000, 64, sparse=True)
    ids = torch.randint(0, 500_000, (8192, 4), generator=gen)
    embedding(ids).square().sum().backward()
    steps = []
    for cls in (shardoptim.SparseAdam, torch.optim.SparseAdam):
        copy_ = copy.deepcopy(embedding)
        copy_.weight.grad = embedding.weight.grad.clone()
        opt = cls(copy_.parameters(), lr=1e-3)
        steps.append((opt.step, lambda: None))
    return steps[0], steps[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = {
        "LBFGS fixed step, quadratic closure": lambda: lbfgs_case("quadratic", None),
        "LBFGS strong_wolfe, quadratic closure": lambda: lbfgs_case("quadratic", "strong_wolfe"),
        "LBFGS fixed step, MLP closure": lambda: lbfgs_case("mlp", None),
        "LBFGS strong_wolfe, MLP closure": lambda: lbfgs_case("mlp", "strong_wolfe"),
        "SparseAdam 500k x 64, 32k ids": sparse_adam_case,
    }
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.reps} interleaved rounds")
    print(f"{'case':42} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>11}")
    for name, build in cases.items():
        ours, theirs = build()
        a, b = interleaved(ours, theirs, args.reps)
        print(f"{name:42} {a * 1e3:9.1f} {b * 1e3:9.1f} {a / b:11.2f}")


if __name__ == "__main__":
    main()
