"""Matrix optimizers: sharded Muon against torch's Muon, MuonAdamW against AdamW, and the balance of
whole-tensor placement.

Run from the repository root::

    torchrun --nproc-per-node 2 -m bench.matrix                 # the step timings and the balance table
    python -m bench.matrix --balance-only                        # the balance table alone (computed)

1. **Muon step, 2 ranks.** The 24 hidden matrices of the GPT-like model of ``bench.params``
   (``gpt_like_shapes()``: 6 blocks of width 384: qkv, attention output, MLP up and down). Ours:
   ``shardoptim.Muon(..., process_group=WORLD)``: each rank orthogonalises the matrices it owns, then
   the bucket's gather; timed as the slowest rank's ``step()`` (gradient average included). torch:
   ``torch.optim.Muon`` on the same matrices in one process (rank 0, while the other rank waits),
   with 1 thread (as each of our ranks has) and with 2 (the cores our two ranks use).
2. **MuonAdamW against AdamW, 2 ranks.** The whole GPT-like model: ``shardoptim.MuonAdamW`` over
   ``muon_param_groups`` against ``shardoptim.AdamW`` over the same parameters, both sharded; one
   ``step()`` each, the slowest rank's time.
3. **Balance.** The largest rank's share of the Muon cost (``m·n·min(m, n)`` per matrix) against the
   even share, for GPT-2 small's 48 hidden matrices at N = 2…64: ours (``assign_owners``: LPT, then
   swaps) against ZeroRedundancyOptimizer's placement (largest tensor first, to the rank with the
   fewest elements), computed from the shapes.

Rounds are interleaved (every variant once per round, the first rotating), after warm-up; medians
and ratios; ``--json`` gets every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

import shardoptim
from bench.params import gpt_like_shapes
from shardoptim.algorithms.muon import cost as muon_cost
from shardoptim.core.layout import ParamSpec, assign_owners

ROOT = Path(__file__).resolve().parents[1]


def gpt2_small_matrices() -> list[tuple[int, int]]:
    return [shape for _ in range(12) for shape in ((768, 2304), (768, 768), (768, 3072), (3072, 768))]


def zero_placement(shapes: list[tuple[int, ...]], world: int) -> dict[int, int]:
    """ZeroRedundancyOptimizer's: tensors by decreasing size, each to the rank with the fewest elements."""
    sizes, owners = [0] * world, {}
    for index in sorted(range(len(shapes)), key=lambda i: -torch.Size(shapes[i]).numel()):
        rank = min(range(world), key=lambda r: sizes[r])
        owners[index] = rank
        sizes[rank] += torch.Size(shapes[index]).numel()
    return owners


def largest_share(owners: dict[int, int], shapes: list[tuple[int, ...]], world: int) -> float:
    loads = [0.0] * world
    for index, rank in owners.items():
        loads[rank] += muon_cost(shapes[index])
    return max(loads) / (sum(loads) / world)


def balance_table() -> list[dict]:
    shapes = gpt2_small_matrices()
    specs = [ParamSpec(i, 0, shape, torch.float32, torch.device("cpu")) for i, shape in enumerate(shapes)]
    rows = []
    for world in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
        ours = largest_share(assign_owners(specs, world, muon_cost), shapes, world)
        zero = largest_share(zero_placement(shapes, world), shapes, world)
        bound = max(muon_cost(s) for s in shapes) / (sum(muon_cost(s) for s in shapes) / world)
        rows.append({"world": world, "ours": ours, "zero": zero, "largest_tensor_bound": max(1.0, bound)})
    return rows


def print_balance(rows: list[dict]) -> None:
    print("\nGPT-2 small, 48 hidden matrices: the largest rank's Muon cost against the even share")
    print(f"{'N':>4} {'ours':>8} {'ZeRO':>8} {'one tensor':>11}")
    for row in rows:
        print(f"{row['world']:>4} {row['ours']:>8.3f} {row['zero']:>8.3f} {row['largest_tensor_bound']:>11.3f}")


def _params(shapes, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for shape in shapes]


def _set_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def _timed_everywhere(step: Callable[[], None]) -> float:
    dist.barrier()
    started = time.perf_counter()
    step()
    return _slowest(time.perf_counter() - started)


def _timed_on_rank0(step: Callable[[], None], threads: int) -> float:
    """``step`` on rank 0 alone with ``threads`` threads; the other ranks wait in a barrier."""
    dist.barrier()
    elapsed = 0.0
    if dist.get_rank() == 0:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        started = time.perf_counter()
        step()
        elapsed = time.perf_counter() - started
        torch.set_num_threads(before)
    dist.barrier()
    return _slowest(elapsed)


def run_steps(rounds: int, warmup: int) -> dict[str, list[float]]:
    world = dist.get_world_size()
    matrices = [shape for shape in gpt_like_shapes()[2:] if len(shape) == 2]
    ours_params, torch_params = _params(matrices, 0), _params(matrices, 0)
    ours = shardoptim.Muon(ours_params, lr=0.02, process_group=dist.group.WORLD)
    theirs = torch.optim.Muon(torch_params, lr=0.02)

    model_shapes = gpt_like_shapes()
    model_a, model_b = _params(model_shapes, 1), _params(model_shapes, 1)
    muon_mask = [len(s) == 2 and i >= 2 for i, s in enumerate(model_shapes)]  # not wte/wpe
    combined = shardoptim.MuonAdamW(
        [{"params": [p for p, m in zip(model_a, muon_mask) if m], "use_muon": True, "lr": 0.02},
         {"params": [p for p, m in zip(model_a, muon_mask) if not m], "use_muon": False, "lr": 3e-4}],
        process_group=dist.group.WORLD)
    adamw = shardoptim.AdamW(model_b, lr=3e-4, process_group=dist.group.WORLD)

    def step_of(opt, params, seed):
        def run():
            _set_grads(params, seed)
            opt.step()
        return run

    variants = {
        f"ours Muon, {world} ranks (1 thread each)": lambda: _timed_everywhere(step_of(ours, ours_params, 2)),
        "torch Muon, 1 process, 1 thread": lambda: _timed_on_rank0(step_of(theirs, torch_params, 2), 1),
        f"torch Muon, 1 process, {world} threads": lambda: _timed_on_rank0(step_of(theirs, torch_params, 2), world),
        f"ours MuonAdamW, {world} ranks": lambda: _timed_everywhere(step_of(combined, model_a, 3)),
        f"ours AdamW, {world} ranks": lambda: _timed_everywhere(step_of(adamw, model_b, 3)),
    }
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            seconds = variants[name]()
            if round_ >= warmup:
                samples[name].append(seconds)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--balance-only", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "matrix.json"))
    args = parser.parse_args()
    rows = balance_table()
    if args.balance_only:
        print_balance(rows)
        return
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        samples = run_steps(args.rounds, args.warmup)
    finally:
        rank = dist.get_rank()
        dist.destroy_process_group()
    if rank != 0:
        return
    medians = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
    names = list(medians)
    print(f"\nstep times, ms (medians of {args.rounds} interleaved rounds; load {os.getloadavg()[0]:.2f})")
    for name in names:
        print(f"  {name:<40} {medians[name]:8.1f}")
    print(f"  ours Muon / torch Muon 1 thread:  {medians[names[0]] / medians[names[1]]:.3f}")
    print(f"  ours Muon / torch Muon {len(names) and names[2].split(', ')[-1]}:  {medians[names[0]] / medians[names[2]]:.3f}")
    print(f"  MuonAdamW / AdamW:                {medians[names[3]] / medians[names[4]]:.3f}")
    print_balance(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"samples": samples, "medians_ms": medians, "balance": rows}, indent=2))


if __name__ == "__main__":
    main()
