"""Sharded-step benchmark: shardoptim's Adam over a process group against the usual alternatives.

Run from the repository root::

    python -m bench.dist                        # spawns 2 gloo ranks on this machine, one thread each
    python -m bench.dist --world-size 4 --reps 20
    torchrun --nproc-per-node 2 -m bench.dist   # the same, launched by torchrun
    python -m bench.dist --collectives          # also single collectives on a 56 MB buffer (DESIGN §6)

On every rank, the GPT-like parameter list of ``bench.params`` (76 tensors, 13.9M elements) with the
same gradients on every rank, and per step:

- ``shardoptim``: ``shardoptim.Adam(..., process_group=WORLD)``: gradient averaging, Adam on the own
  shard, gathering of the parameters (pipelined over buckets);
- ``(a) all-reduce + fused Adam``: what DDP does (gradients in 25 MiB buckets, each divided by the
  world size and all-reduced, launched together) followed by torch's fused Adam on every rank:
  replicated, full optimizer state on every rank, no parameter exchange;
- ``(b) ZeroRedundancyOptimizer``: the same all-reduce, then torch's ZeroRedundancyOptimizer over
  torch's Adam in its default configuration, and ``(b) ... bucket view`` with
  ``parameters_as_bucket_view=True``.

The variants run round-robin (the first one rotating each round), every sample is the slowest rank's
time, and the table shows medians, a split into communication and update (timed separately, so it
does not show the overlap the pipelined step gets), per-rank optimizer state, and the time to gather
a full state dict against ``ZeroRedundancyOptimizer.consolidate_state_dict``. Results go to stdout
and, with every sample, to ``--json`` (default ``bench/results/dist.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer

import shardoptim
from bench.params import clone_with_grads, gpt_like_shapes, make_grads, make_params, numel
from shardoptim.core import distributed as sharded_comm

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "dist.json"
LR = 1e-3
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb
MiB = 1024 * 1024

#: Targets of issue 6, as (variant, reference, largest allowed ratio of step times).
TARGETS = (("shardoptim", "(b) ZeroRedundancyOptimizer", 0.85), ("shardoptim", "(a) all-reduce + fused Adam", 1.2))


# -- the competitors --------------------------------------------------------------------------------


class DDPStyleGrads:
    """Gradients as views of flat buckets of at most 25 MiB, filled in reverse parameter order, as DDP
    lays them out; ``all_reduce()`` divides each bucket by the world size and all-reduces them together."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.buffers: list[torch.Tensor] = []
        groups: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for param in reversed(params):
            if groups[-1] and size + param.numel() * param.element_size() > DDP_BUCKET_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(param)
            size += param.numel() * param.element_size()
        for members in groups:
            flat = torch.cat([p.grad.reshape(-1) for p in members])
            offset = 0
            for p in members:
                p.grad = flat[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
            self.buffers.append(flat)

    def all_reduce(self) -> None:
        world = dist.get_world_size()
        works = []
        for flat in self.buffers:
            flat.div_(world)
            works.append(dist.all_reduce(flat, async_op=True))
        for work in works:
            work.wait()


def state_bytes(state: dict[Any, dict[str, Any]]) -> int:
    return sum(v.numel() * v.element_size() for entry in state.values() for v in entry.values()
               if isinstance(v, torch.Tensor))


class Ours:
    label = "shardoptim"

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.opt = shardoptim.Adam(params, lr=LR, process_group=dist.group.WORLD)
        self.every = [list(range(len(bucket.params))) for bucket in self.opt.buckets]

    def step(self) -> None:
        self.opt.step()

    def phases(self) -> dict[str, Callable[[], Any]]:
        comm = self.opt._comm
        buckets = self.opt.buckets

        def update() -> None:  # the update of every bucket's own shard, without any communication
            for bucket, positions in zip(buckets, self.every):
                self.opt._update_bucket(bucket, positions)

        return {"average grads": lambda: comm.average_grads(buckets), "update": update,
                "gather params": lambda: comm.gather_params(buckets)}

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.opt.buckets for t in [*b.state.values(), b.step_tensor])


class Replicated:
    label = "(a) all-reduce + fused Adam"

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.grads = DDPStyleGrads(params)
        self.opt = torch.optim.Adam(params, lr=LR, fused=True)

    def step(self) -> None:
        self.grads.all_reduce()
        self.opt.step()

    def phases(self) -> dict[str, Callable[[], Any]]:
        return {"all-reduce grads": self.grads.all_reduce, "update": self.opt.step}

    def state_bytes(self) -> int:
        return state_bytes(self.opt.state)


class Zero:
    def __init__(self, params: list[torch.nn.Parameter], *, bucket_view: bool) -> None:
        self.label = "(b) ZeroRedundancyOptimizer" + (" bucket view" if bucket_view else "")
        self.grads = DDPStyleGrads(params)
        self.opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.Adam, lr=LR,
                                           parameters_as_bucket_view=bucket_view)

    def step(self) -> None:
        self.grads.all_reduce()
        self.opt.step()

    def phases(self) -> dict[str, Callable[[], Any]]:
        # ZeroRedundancyOptimizer.step() = the local optimizer's step + broadcasting the parameters.
        return {"all-reduce grads": self.grads.all_reduce, "update": self.opt.optim.step,
                "update + broadcast params": self.opt.step}

    def state_bytes(self) -> int:
        return state_bytes(self.opt.optim.state)


# -- timing -----------------------------------------------------------------------------------------


def slowest(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (a collective, outside any timed region)."""
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def timed(call: Callable[[], Any]) -> float:
    dist.barrier()
    start = time.perf_counter()
    call()
    return slowest(time.perf_counter() - start)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()  # a collection landing inside one call would be charged to it
    try:
        yield
    finally:
        gc.enable()


def interleave(calls: dict[str, Callable[[], Any]], *, reps: int, warmup: int) -> dict[str, list[float]]:
    """Every call ``reps`` times round-robin (after ``warmup`` rounds), starting one further each round."""
    labels = list(calls)
    for _ in range(warmup):
        for label in labels:
            calls[label]()
    samples: dict[str, list[float]] = {label: [] for label in labels}
    with no_gc():
        for rep in range(reps):
            shift = rep % len(labels)
            for label in labels[shift:] + labels[:shift]:
                samples[label].append(timed(calls[label]))
    return samples


def ms(samples: Sequence[float]) -> float:
    return 1e3 * statistics.median(samples)


# -- the measurements ------------------------------------------------------------------------------


def bench_steps(args: argparse.Namespace) -> dict[str, Any]:
    shapes = gpt_like_shapes()
    params, grads = make_params(shapes), make_grads(shapes)
    competitors = [Ours(clone_with_grads(params, grads)), Replicated(clone_with_grads(params, grads)),
                   Zero(clone_with_grads(params, grads), bucket_view=False),
                   Zero(clone_with_grads(params, grads), bucket_view=True)]
    for cap in args.caps:
        saved = sharded_comm.SHARDED_BUCKET_CAP_NUMEL
        sharded_comm.SHARDED_BUCKET_CAP_NUMEL = cap
        try:
            extra = Ours(clone_with_grads(params, grads))
        finally:
            sharded_comm.SHARDED_BUCKET_CAP_NUMEL = saved
        extra.label = f"shardoptim, buckets of {cap} elements"
        competitors.append(extra)

    steps = interleave({c.label: c.step for c in competitors}, reps=args.reps, warmup=args.warmup)
    phase_calls = {f"{c.label} | {name}": call for c in competitors[:4] for name, call in c.phases().items()}
    phases = interleave(phase_calls, reps=max(5, args.reps // 2), warmup=1)
    total = 2 * 4 * numel(shapes)  # Adam: exp_avg and exp_avg_sq, float32
    result: dict[str, Any] = {
        "elements": numel(shapes), "tensors": len(shapes), "unsharded_state_bytes": total,
        "buckets": len(competitors[0].opt.buckets),
        "steps": {c.label: {"median_ms": ms(steps[c.label]), "samples_ms": [1e3 * s for s in steps[c.label]],
                            "state_bytes_per_rank": c.state_bytes()} for c in competitors},
        "phases_ms": {label: ms(samples) for label, samples in phases.items()},
    }
    result["states"] = bench_state_dict(competitors[0], competitors[2], reps=args.state_reps)
    return result


def bench_state_dict(ours: Ours, zero: Zero, *, reps: int) -> dict[str, float]:
    """A full state dict: ours on every rank / on rank 0, against consolidate_state_dict(to=0) + state_dict()."""
    def consolidate() -> None:
        zero.opt.consolidate_state_dict(to=0)
        if dist.get_rank() == 0:
            zero.opt.state_dict()

    samples = interleave({"shardoptim state_dict() on every rank": ours.opt.state_dict,
                          "shardoptim state_dict(rank0_only=True)": lambda: ours.opt.state_dict(rank0_only=True),
                          "ZeroRedundancyOptimizer consolidate_state_dict(to=0)": consolidate},
                         reps=reps, warmup=1)
    return {label: ms(values) for label, values in samples.items()}


def bench_collectives(reps: int) -> dict[str, float]:
    """Single collectives on one 56 MB float32 buffer (DESIGN §6), interleaved; the two marked
    "shardoptim" run ``ShardedComm``'s own code for one bucket of that size."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = 14 * 1024 * 1024 // world * world
    size = n // world
    flat, received = torch.randn(n), torch.empty(n)
    shard = flat[rank * size : (rank + 1) * size]
    comm = sharded_comm.ShardedComm(dist.group.WORLD)

    def wait(works: Sequence[dist.Work]) -> None:
        for work in works:
            work.wait()

    calls = {
        "all_reduce": lambda: dist.all_reduce(flat),
        "reduce_scatter (single tensor)": lambda: sharded_comm.reduce_scatter_single(received[:size], flat),
        "shardoptim average: all_to_all_single + add": lambda: comm._launch_all_to_all(flat, shard).finish(),
        "all_gather (single tensor)": lambda: sharded_comm.all_gather_single(received, shard),
        "all_gather (list)": lambda: dist.all_gather(list(received.split(size)), shard),
        "shardoptim gather: broadcast per shard owner": lambda: wait(comm._launch_gather(flat, shard, None)),
    }
    return {label: ms(values) for label, values in interleave(calls, reps=reps, warmup=1).items()}


# -- report -----------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> list[str]:
    world = result["world_size"]
    lines = [f"bench.dist: {result['tensors']} tensors, {result['elements'] / 1e6:.1f}M elements, "
             f"{world} ranks ({result['backend']}, {result['threads']} thread(s) each), "
             f"{result['buckets']} buckets, median of {result['reps']} steps"]
    steps = result["steps"]
    zero = steps["(b) ZeroRedundancyOptimizer"]["median_ms"]
    replicated = steps["(a) all-reduce + fused Adam"]["median_ms"]
    lines.append(f"{'variant':48s} {'step ms':>9s} {'/ (a)':>7s} {'/ (b)':>7s} {'state MiB/rank':>15s}")
    for label, row in steps.items():
        lines.append(f"{label:48s} {row['median_ms']:9.1f} {row['median_ms'] / replicated:7.2f} "
                     f"{row['median_ms'] / zero:7.2f} {row['state_bytes_per_rank'] / MiB:15.1f}")
    total = result["unsharded_state_bytes"]
    ours = steps["shardoptim"]["state_bytes_per_rank"]
    lines.append(f"unsharded Adam state {total / MiB:.1f} MiB; shardoptim per rank {ours / MiB:.2f} MiB = "
                 f"{ours / (total / world):.4f} x (total / {world})")
    lines.append("time split (each part timed on its own, ms):")
    for label, value in result["phases_ms"].items():
        lines.append(f"  {label:70s} {value:8.1f}")
    lines.append("full state dict (ms):")
    states = result["states"]
    for label, value in states.items():
        lines.append(f"  {label:70s} {value:8.1f}")
    consolidate = states["ZeroRedundancyOptimizer consolidate_state_dict(to=0)"]
    lines.append(f"  consolidate_state_dict / ours on every rank: "
                 f"{consolidate / states['shardoptim state_dict() on every rank']:.1f} x")
    for variant, reference, limit in TARGETS:
        ratio = steps[variant]["median_ms"] / steps[reference]["median_ms"]
        lines.append(f"target {variant} / {reference} <= {limit}: {ratio:.2f} {'ok' if ratio <= limit else 'MISSED'}")
    if "collectives_ms" in result:
        lines.append("single collectives, one 56 MB float32 buffer (ms):")
        for label, value in result["collectives_ms"].items():
            lines.append(f"  {label:48s} {value:8.1f}")
    return lines


def run_rank(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    try:
        result: dict[str, Any] = {
            "world_size": dist.get_world_size(), "backend": dist.get_backend(), "threads": torch.get_num_threads(),
            "reps": args.reps, "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        result.update(bench_steps(args))
        if args.collectives:
            result["collectives_ms"] = bench_collectives(args.reps)
        if dist.get_rank() == 0:
            print("\n".join(report(result)), flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
        dist.barrier()  # leave together: a rank tearing gloo down early can abort a peer's exit
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.world_size), OMP_NUM_THREADS=str(args.threads))
    run_rank(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2, help="ranks to spawn when not under torchrun")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (torchrun sets 1)")
    parser.add_argument("--reps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--state-reps", type=int, default=3, help="timed full state dicts per variant")
    parser.add_argument("--collectives", action="store_true", help="also time single collectives (DESIGN §6)")
    parser.add_argument("--caps", type=lambda s: [int(float(v)) for v in s.split(",")], default=[],
                        help="extra shardoptim variants with these bucket caps (elements), e.g. 1e6,8e6")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # launched by torchrun
        run_rank(args)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(args, port), nprocs=args.world_size, start_method="spawn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
