"""Optimizer-step benchmark: shardoptim against torch.optim, interleaved in one process.

Run from the repository root::

    python -m bench.step                  # SGD, Adam, AdamW, every workload: ~1 minute on 2 quiet cores
    python -m bench.step --algos all      # every algorithm of ALGORITHMS that shardoptim has: ~3 minutes
    python -m bench.step --algos Adam,SGD --workloads gpt --reps 50 --json /tmp/step.json

For every algorithm of ``ALGORITHMS`` that shardoptim already has, and every parameter list of
``bench.params.WORKLOADS``, each implementation of ours (default, foreach, for-loop, fused) and of
torch's (for-loop, foreach, fused where torch has it) gets its own copy of the same parameters, with
the same gradients set once. Their ``step()`` calls then run in rounds, each round in a new random
order, in ``--sessions`` sessions that build every competitor anew (where its memory lands matters
here), and the table reports the median over ``--reps`` rounds after warm-up, each
implementation's ratio to torch's fastest and to torch's default (for-loop on CPU), the first call
on its own (state allocation; compilation for compiled kernels), and the memory-bandwidth limit of
DESIGN §6: bytes an update must move per element × elements ÷ the best bandwidth measured in this
run (a large copy and torch's fused Adam over one flat buffer).

The ``train-*`` workloads time whole training iterations of small models (``bench.params.MODELS``:
forward+backward, step, ``zero_grad(set_to_none=True)``), so the cost of gathering the fresh
gradients into flat buffers is counted too.

Results go to stdout and, with every sample, to ``--json`` (default ``bench/results/step.json``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import shardoptim
from bench.params import MODELS, WORKLOADS, clone_with_grads, make_grads, make_params, numel

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "step.json"


@dataclass(frozen=True)
class Algorithm:
    """One row family of the table: the same algorithm in shardoptim and torch.optim."""

    name: str  # shardoptim's class of this name is looked up at run time: it may not exist yet
    torch_class: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]
    #: fp32 bytes one update must read and write per element (DESIGN §6), for the bandwidth limit.
    bytes_per_element: int

    @property
    def ours_class(self) -> type[torch.optim.Optimizer] | None:
        return getattr(shardoptim, self.name, None)


# LBFGS (a closure re-evaluating the loss many times per step) and SparseAdam (sparse gradients) are
# not elementwise updates over dense gradients: they need benchmarks of their own.
ALGORITHMS: tuple[Algorithm, ...] = (
    Algorithm("SGD", torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}, 20),
    Algorithm("Adam", torch.optim.Adam, {"lr": 1e-3}, 28),
    Algorithm("AdamW", torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}, 28),
    Algorithm("Adagrad", torch.optim.Adagrad, {"lr": 1e-2}, 20),
    Algorithm("ASGD", torch.optim.ASGD, {"lr": 1e-2}, 20),
    Algorithm("RMSprop", torch.optim.RMSprop, {"lr": 1e-2}, 20),
    Algorithm("Adadelta", torch.optim.Adadelta, {"lr": 1.0}, 28),
    Algorithm("Adamax", torch.optim.Adamax, {"lr": 2e-3}, 28),
    Algorithm("NAdam", torch.optim.NAdam, {"lr": 2e-3}, 28),
    Algorithm("RAdam", torch.optim.RAdam, {"lr": 1e-3}, 28),
    Algorithm("Rprop", torch.optim.Rprop, {"lr": 1e-2}, 28),
)


@dataclass(frozen=True)
class Variant:
    """One implementation of one library: the flags passed to the optimizer's constructor."""

    library: str  # "ours" or "torch"
    implementation: str
    flags: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.library} {self.implementation}"


OURS = (
    Variant("ours", "default"),
    Variant("ours", "foreach", {"foreach": True}),
    Variant("ours", "for-loop", {"foreach": False}),
    Variant("ours", "fused", {"fused": True}),
)
THEIRS = (
    Variant("torch", "for-loop", {"foreach": False}),
    Variant("torch", "foreach", {"foreach": True}),
    Variant("torch", "fused", {"fused": True}),
)
#: The algorithms of the issue's targets: a default run covers them in about a minute.
DEFAULT_ALGORITHMS = ("SGD", "Adam", "AdamW")
#: What torch.optim runs on CPU when given neither ``foreach`` nor ``fused``.
TORCH_DEFAULT = "torch for-loop"
#: The algorithm of the training-loop workloads, and each model's batch size.
TRAIN_ALGORITHM = "AdamW"
TRAIN_BATCH = {"mlp": 64, "tinygpt": 4}
#: Training iterations are cheap to repeat and their ratios are the closest to 1: they get this many
#: times ``--reps`` rounds.
TRAIN_REPS_FACTOR = 3


@dataclass(frozen=True)
class Target:
    """A goal of the issue: ours' default takes at most ``at_most`` × the ``reference``'s median."""

    workload: str
    algorithm: str
    reference: str  # a variant label, or "torch best"
    at_most: float


TARGETS: tuple[Target, ...] = (
    Target("gpt", "Adam", "torch best", 1.0),
    Target("gpt", "AdamW", "torch best", 1.0),
    Target("gpt", "SGD", "torch best", 1.0),
    Target("gpt", "Adam", TORCH_DEFAULT, 0.5),
    Target("gpt", "AdamW", TORCH_DEFAULT, 0.5),
    Target("small", "Adam", "torch fused", 0.7),
    *(Target(f"train-{model}", TRAIN_ALGORITHM, "torch best", 1.0) for model in MODELS),
)


# -- timing -----------------------------------------------------------------------------------------


def summarise(samples: Sequence[float], first: float | None = None) -> dict[str, Any]:
    """Median and quartiles in milliseconds of ``samples`` (seconds)."""
    ms = [1e3 * s for s in samples]
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    summary = {"median_ms": statistics.median(ms), "p25_ms": q1, "p75_ms": q3, "samples_ms": ms}
    if first is not None:
        summary["first_ms"] = 1e3 * first
    return summary


#: A call timed by ``interleave``; it may return its own phase durations (seconds).
Call = Callable[[], "dict[str, float] | None"]


def interleave(
    build: Callable[[Sequence[str]], dict[str, Call]], labels: Sequence[str], *, reps: int, warmup: int,
    sessions: int,
) -> dict[str, dict[str, Any]]:
    """Time the calls ``build(order)`` makes for ``labels``, interleaved; a summary per label.

    First, the calls are built in the given order and each one's first call is timed on its own
    (state allocation; compilation, which the first of ours lands on). Then, since where a call's
    memory lands matters on this machine (up to tens of percent for the same kernel; the first
    buffers allocated after large ones were freed fare worst), the calls are built ``sessions`` times
    more, each time in a new random order, and the samples of all sessions are pooled. Each session
    runs every call once and ``warmup`` rounds untimed, then ``reps / sessions`` timed rounds, each in
    a new random order so that no call always follows the same other.
    """
    rng = random.Random(0)
    calls = build(labels)
    first: dict[str, float] = {}
    for label in labels:
        start = time.perf_counter()
        calls[label]()
        first[label] = time.perf_counter() - start
    del calls
    gc.collect()
    totals: dict[str, list[float]] = {label: [] for label in labels}
    phases: dict[str, dict[str, list[float]]] = {label: {} for label in labels}
    for _ in range(sessions):
        order = list(labels)
        rng.shuffle(order)
        calls = build(order)
        for _ in range(1 + warmup):
            for label in order:
                calls[label]()
        gc.collect()
        gc.disable()  # a collection landing inside one call would be charged to it
        try:
            for _ in range(-(-reps // sessions)):
                rng.shuffle(order)
                for label in order:
                    start = time.perf_counter()
                    parts = calls[label]()
                    totals[label].append(time.perf_counter() - start)
                    for name, seconds in (parts or {}).items():
                        phases[label].setdefault(name, []).append(seconds)
        finally:
            gc.enable()
        del calls
        gc.collect()
    results = {}
    for label in labels:
        results[label] = summarise(totals[label], first[label])
        if phases[label]:
            results[label]["phases"] = {
                name: summarise(values)["median_ms"] for name, values in phases[label].items()
            }
    return results


def measure_bandwidth(*, reps: int = 20) -> dict[str, float]:
    """Best memory bandwidth (GB/s) of a large copy and of torch's fused Adam over one flat buffer."""
    found = {}
    n = 1 << 25  # 128 MiB per buffer: far beyond any cache
    src, dst = torch.ones(n), torch.empty(n)
    found["copy"] = 2 * 4 * n / _best_time(lambda: dst.copy_(src), reps)
    del src, dst
    n = 1 << 24
    p, g, m, v = (torch.full((n,), value) for value in (0.5, 1e-3, 0.0, 0.0))
    step = torch.zeros(())

    def adam() -> None:
        torch._fused_adam_([p], [g], [m], [v], [], [step], lr=1e-3, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)

    found["fused_adam"] = 28 * n / _best_time(adam, reps)
    return {name: bytes_per_second / 1e9 for name, bytes_per_second in found.items()}


def _best_time(call: Callable[[], Any], reps: int) -> float:
    call()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


# -- the benchmarks --------------------------------------------------------------------------------


def construct(variant: Variant, algorithm: Algorithm, params: Any) -> torch.optim.Optimizer:
    cls = algorithm.ours_class if variant.library == "ours" else algorithm.torch_class
    return cls(params, **algorithm.kwargs, **variant.flags)


def bench_step(
    algorithm: Algorithm, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, reps: int,
    warmup: int, sessions: int,
) -> dict[str, Any]:
    """``step()`` of every implementation of ours and torch's, each on its own copy of ``params``."""
    variants, skipped = {}, {}
    for variant in OURS + THEIRS:
        try:
            construct(variant, algorithm, clone_with_grads(params[:1], grads[:1]))
        except (TypeError, RuntimeError, ValueError) as error:  # an implementation this algorithm lacks
            skipped[variant.label] = f"{type(error).__name__}: {error}"
        else:
            variants[variant.label] = variant

    def build(order: Sequence[str]) -> dict[str, Call]:
        return {
            label: construct(variants[label], algorithm, clone_with_grads(params, grads)).step for label in order
        }

    timings = interleave(build, list(variants), reps=reps, warmup=warmup, sessions=sessions)
    return {"variants": timings, "skipped": skipped}


def bench_training(
    algorithm: Algorithm, model_name: str, *, reps: int, warmup: int, sessions: int
) -> dict[str, Any]:
    """Whole training iterations of ``MODELS[model_name]``: ours' default against torch's default and fused.

    Every implementation trains its own copy of the same model on the same batch; the phases
    (forward+backward, step, zero_grad) are timed too, since ours moves work between them.
    """
    torch.manual_seed(0)
    reference = MODELS[model_name]()
    batch = reference.example_batch(TRAIN_BATCH[model_name], torch.Generator().manual_seed(2))
    variants = {v.label: v for v in (OURS[0], *THEIRS) if v.implementation in ("default", "for-loop", "fused")}

    def iteration(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            t0 = time.perf_counter()
            model(*batch).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            return {"forward+backward": t1 - t0, "step": t2 - t1, "zero_grad": t3 - t2}

        return run

    def build(order: Sequence[str]) -> dict[str, Call]:
        calls = {}
        for label in order:
            model = copy.deepcopy(reference)
            calls[label] = iteration(model, construct(variants[label], algorithm, model.parameters()))
        return calls

    parameters = list(reference.parameters())
    return {
        "model": f"{type(reference).__name__}: {len(parameters)} tensors, "
                 f"{sum(p.numel() for p in parameters):,} parameters, batch {TRAIN_BATCH[model_name]}",
        "variants": interleave(build, list(variants), reps=reps, warmup=warmup, sessions=sessions),
        "skipped": {},
    }


def add_ratios(result: dict[str, Any]) -> None:
    """Each variant's median over torch's fastest and over torch's default (for-loop on CPU)."""
    variants = result["variants"]
    theirs = {label: t["median_ms"] for label, t in variants.items() if label.startswith("torch ")}
    best_label = min(theirs, key=theirs.get)
    result["torch_best"] = best_label
    for timing in variants.values():
        timing["vs_torch_best"] = timing["median_ms"] / theirs[best_label]
        if TORCH_DEFAULT in theirs:
            timing["vs_torch_default"] = timing["median_ms"] / theirs[TORCH_DEFAULT]


def check_targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for target in TARGETS:
        result = results.get(target.workload, {}).get(target.algorithm)
        if result is None or "ours default" not in result["variants"]:
            continue
        variants = result["variants"]
        reference = result["torch_best"] if target.reference == "torch best" else target.reference
        if reference not in variants:
            continue
        ratio = variants["ours default"]["median_ms"] / variants[reference]["median_ms"]
        checked.append({
            "workload": target.workload, "algorithm": target.algorithm, "reference": reference,
            "at_most": target.at_most, "ratio": ratio, "met": ratio <= target.at_most,
        })
    return checked


# -- report ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "shardoptim": shardoptim.__version__, "revision": revision(),
        "python": platform.python_version(), "platform": platform.platform(),
    }


def revision() -> str:
    """The git commit benchmarked, marked ``+dirty`` when the working tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def load_average() -> float:
    """The 1-minute load average (NaN where unknown): much above zero, others are using the machine."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def print_table(title: str, rows: dict[str, dict[str, Any]], limits: dict[str, str]) -> None:
    print(f"\n{title}")
    header = (f"{'algorithm':<9} {'implementation':<15} {'median ms':>10} {'p25-p75 ms':>15} {'first ms':>9} "
              f"{'/torch best':>11} {'/torch for-loop':>15}")
    print(header)
    print("-" * len(header))
    for name, result in rows.items():
        if name in limits:
            print(f"{name:<9} {'memory limit':<15} {limits[name]}")
        for label, t in result["variants"].items():
            spread = f"{t['p25_ms']:.2f}-{t['p75_ms']:.2f}"
            default = f"{t['vs_torch_default']:.2f}" if "vs_torch_default" in t else "-"
            print(f"{'' if name in limits else name:<9} {label:<15} {t['median_ms']:>10.2f} {spread:>15} "
                  f"{t['first_ms']:>9.1f} {t['vs_torch_best']:>11.2f} {default:>15}")
            if "phases" in t:
                print(f"{'':<25} " + ", ".join(f"{k} {v:.2f}" for k, v in t["phases"].items()))
        for label, reason in result["skipped"].items():
            print(f"{'':<9} {label:<15} skipped: {reason.splitlines()[0][:70]}")


def main(argv: Sequence[str] | None = None) -> int:
    names = [a.name for a in ALGORITHMS]
    workloads = [*WORKLOADS, *(f"train-{model}" for model in MODELS)]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", default=",".join(DEFAULT_ALGORITHMS),
                        help=f"comma-separated subset of: {','.join(names)}; or 'all' "
                             f"(default: {','.join(DEFAULT_ALGORITHMS)})")
    parser.add_argument("--workloads", default=",".join(workloads),
                        help="comma-separated subset of: " + ",".join(workloads) + " (default: all)")
    parser.add_argument("--reps", type=int, default=30,
                        help=f"timed rounds per table (default 30; train-* run {TRAIN_REPS_FACTOR}x as many)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed rounds before the timed ones, per session (default 3)")
    parser.add_argument("--sessions", type=int, default=3,
                        help="times every table's competitors are built anew, in a new random order (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: cores)")
    parser.add_argument("--cold-compile", action="store_true",
                        help="compile into an empty inductor cache, so 'first ms' of compiled kernels is "
                             "the whole compilation (default: the user's cache, as a second run sees it)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"output file (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)

    wanted_algos = names if args.algos == "all" else args.algos.split(",")
    wanted_workloads = args.workloads.split(",")
    for name in wanted_algos:
        if name not in names:
            parser.error(f"unknown algorithm {name!r}")
    for name in wanted_workloads:
        if name not in workloads:
            parser.error(f"unknown workload {name!r}")
    torch.set_num_threads(args.threads)
    algorithms = [a for a in ALGORITHMS if a.name in wanted_algos]
    missing = [a.name for a in algorithms if a.ours_class is None]
    algorithms = [a for a in algorithms if a.ours_class is not None]

    info = machine()
    load = load_average()
    print(f"{info['cpu']}, {info['cores']} cores, load average {load:.2f}; torch {info['torch']} with "
          f"{info['threads']} threads; shardoptim {info['shardoptim']} at {info['revision']}")
    if load > 0.5 * (os.cpu_count() or 1):
        print("warning: other processes are using this machine; the figures will be noisy")
    print(f"median of {args.reps} interleaved rounds ({TRAIN_REPS_FACTOR * args.reps} for train-*) in "
          f"{args.sessions} sessions, each after {args.warmup} warm-up rounds")
    if missing:
        print(f"not in shardoptim yet, skipped: {', '.join(missing)}")
    if args.cold_compile:
        cold_cache = tempfile.TemporaryDirectory(prefix="bench-step-inductor-")  # removed when main returns
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_cache.name

    started = time.perf_counter()
    bandwidth = {"start": measure_bandwidth()}
    results: dict[str, dict[str, Any]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for workload in [w for w in WORKLOADS if w in wanted_workloads]:
        shapes = WORKLOADS[workload]()
        sizes[workload] = (len(shapes), numel(shapes))
        params, grads = make_params(shapes, seed=0), make_grads(shapes, seed=1)
        results[workload] = {}
        for algorithm in algorithms:
            print(f"measuring {workload} {algorithm.name} ...", file=sys.stderr, flush=True)
            results[workload][algorithm.name] = bench_step(algorithm, params, grads, reps=args.reps,
                                                           warmup=args.warmup, sessions=args.sessions)
        del params, grads
        gc.collect()
    algorithm = next(a for a in ALGORITHMS if a.name == TRAIN_ALGORITHM)
    for model in MODELS:
        workload = f"train-{model}"
        if workload in wanted_workloads and algorithm.ours_class is not None:
            print(f"measuring {workload} ...", file=sys.stderr, flush=True)
            results[workload] = {algorithm.name: bench_training(
                algorithm, model, reps=TRAIN_REPS_FACTOR * args.reps, warmup=args.warmup, sessions=args.sessions)}
    bandwidth["end"] = measure_bandwidth()
    seconds = time.perf_counter() - started

    best_bandwidth = max(v for measured in bandwidth.values() for v in measured.values())
    print("memory bandwidth (GB/s), best of two: "
          + "; ".join(f"{when}: " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items())
                      for when, measured in bandwidth.items())
          + f"; the limits below use {best_bandwidth:.1f} GB/s")
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.step", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info, "reps": args.reps, "warmup": args.warmup, "sessions": args.sessions,
        "cold_compile": args.cold_compile,
        "bandwidth_gbps": bandwidth, "best_bandwidth_gbps": best_bandwidth, "workloads": {},
    }
    for workload, rows in results.items():
        limits = {}
        for name, result in rows.items():
            add_ratios(result)
            if workload in sizes:
                per_element = next(a for a in ALGORITHMS if a.name == name).bytes_per_element
                limit_ms = 1e3 * per_element * sizes[workload][1] / (best_bandwidth * 1e9)
                result["bytes_per_element"], result["limit_ms"] = per_element, limit_ms
                ours = result["variants"]["ours default"]["median_ms"]
                limits[name] = (f"{limit_ms:>10.2f}   ({per_element} B/element; ours' default takes "
                                f"{ours / limit_ms:.2f}x this)")
        if workload in sizes:
            tensors, elements = sizes[workload]
            report["workloads"][workload] = {"tensors": tensors, "elements": elements, "algorithms": rows}
            title = f"== {workload}: {tensors} tensors, {elements:,} fp32 elements: step() =="
        else:
            model = next(iter(rows.values()))["model"]
            report["workloads"][workload] = {"model": model, "algorithms": rows}
            title = f"== {workload}: {model}: forward+backward, step, zero_grad(set_to_none=True) =="
        print_table(title, rows, limits)

    report["targets"] = check_targets(results)
    if report["targets"]:
        print("\n== targets (ours' default) ==")
        for t in report["targets"]:
            verdict = "met" if t["met"] else "MISSED"
            print(f"{t['workload']:<13} {t['algorithm']:<6} / {t['reference']:<15} {t['ratio']:.3f} "
                  f"(at most {t['at_most']:.1f}): {verdict}")
    report["load_average"] = {"start": load, "end": load_average()}
    report["seconds"] = seconds
    print(f"\nload average at the end {report['load_average']['end']:.2f}; {seconds:.0f} s of measurement")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
