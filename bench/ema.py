"""EMA-update benchmark: ``ShardedEMA.update`` against torch's ``AveragedModel`` EMA, interleaved in one process.

Run from the repository root::

    python -m bench.ema                       # about 30 s on 2 CPU cores
    python -m bench.ema --reps 50 --device cuda --json /tmp/ema.json

The parameters are ``bench.params``'s GPT-like list (76 tensors, 14.0M float32 elements), held by a
shardoptim Adam (one flat bucket, unsharded) for ``ShardedEMA`` and, as separate tensors, by an
``nn.ParameterList`` for the ``AveragedModel``s built with ``get_ema_multi_avg_fn(0.999)``. Every
average has had its first (copying) update before timing, so every timed call is an EMA step.

Rows: ours, torch's ``AveragedModel.update_parameters``, shardoptim's ``AveragedModel`` (a drop-in,
so expected equal to torch's), and the bare ``torch._foreach_lerp_`` over the per-tensor lists that
torch's EMA ends in (torch's kernel time without ``AveragedModel``'s Python work). Calls run
round-robin, the starting row rotating every round; the table reports medians over ``--reps`` rounds
and each row's ratio to torch's ``AveragedModel``.

The memory limit (DESIGN §6): an EMA step reads the average and the weights and writes the average,
12 bytes per float32 element; × elements ÷ the best bandwidth measured in this run (a large copy, and
a ``lerp_`` over large flat buffers, the same three-stream kernel).

Results go to stdout and, with every sample, to ``--json`` (default ``bench/results/ema.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import swa_utils

import shardoptim
import shardoptim.ema
from bench.params import gpt_like_shapes, make_params, numel

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "ema.json"
DECAY = 0.999
BYTES_PER_ELEMENT = 12  # read average, read weights, write average (float32)
TARGET_RATIO = 0.85  # ShardedEMA.update time / torch AveragedModel.update_parameters time
REFERENCE = "torch AveragedModel"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    call()
    _synchronize(device)
    return time.perf_counter() - start


def interleave(
    calls: dict[str, Callable[[], Any]], *, reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of every label, timed round-robin with the starting label rotating."""
    labels = list(calls)
    for _ in range(warmup):
        for label in labels:
            calls[label]()
    samples: dict[str, list[float]] = {label: [] for label in labels}
    gc.collect()
    gc.disable()  # a collection inside one call would be charged to it
    try:
        for rep in range(reps):
            shift = rep % len(labels)
            for label in labels[shift:] + labels[:shift]:
                samples[label].append(_timed(calls[label], device))
    finally:
        gc.enable()
    return samples


def measure_bandwidth(device: torch.device, *, reps: int = 10) -> dict[str, float]:
    """Best GB/s of a large copy (8 B/element) and of a large flat ``lerp_`` (12 B/element)."""
    n = 1 << 25  # 128 MiB per float32 buffer: far beyond any cache
    found = {}
    source, target = torch.ones(n, device=device), torch.empty(n, device=device)
    found["copy"] = 8 * n / min(_timed(lambda: target.copy_(source), device) for _ in range(reps))
    found["flat lerp"] = 12 * n / min(_timed(lambda: target.lerp_(source, 1 - DECAY), device) for _ in range(reps))
    return {name: rate / 1e9 for name, rate in found.items()}


def build_competitors(device: torch.device) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The timed calls, each over its own copy of the same GPT-like parameters."""
    shapes = gpt_like_shapes()
    flat_params = make_params(shapes, device=str(device))
    optimizer = shardoptim.Adam(flat_params, lr=1e-3)
    ema = shardoptim.ema.ShardedEMA(optimizer, decay=DECAY)
    ema.update()

    holder = nn.ParameterList(make_params(shapes, device=str(device)))
    theirs = swa_utils.AveragedModel(holder, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(DECAY))
    ours = shardoptim.ema.AveragedModel(holder, multi_avg_fn=shardoptim.ema.get_ema_multi_avg_fn(DECAY))
    theirs.update_parameters(holder)
    ours.update_parameters(holder)
    bare = swa_utils.AveragedModel(holder)
    averages = [p.detach() for p in bare.module.parameters()]
    currents = [p.detach() for p in holder]

    calls = {
        "ShardedEMA.update": ema.update,
        REFERENCE: lambda: theirs.update_parameters(holder),
        "shardoptim AveragedModel": lambda: ours.update_parameters(holder),
        "torch _foreach_lerp_ only": lambda: torch._foreach_lerp_(averages, currents, 1 - DECAY),
    }
    info = {
        "tensors": len(shapes),
        "elements": numel(shapes),
        "buckets": len(optimizer.buckets),
        "sharded_ema_elements": sum(shard.numel() for shard in ema.shards),
    }
    return calls, info


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    found = {
        "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "shardoptim": shardoptim.__version__, "python": platform.python_version(), "device": str(device),
    }
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    return found


def summarise(samples: Sequence[float], reference_median_ms: float) -> dict[str, Any]:
    ms = [1e3 * s for s in samples]
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    median = statistics.median(ms)
    return {
        "median_ms": median, "p25_ms": q1, "p75_ms": q3,
        "ratio_to_torch": median / reference_median_ms, "samples_ms": ms,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    bandwidth = measure_bandwidth(device)
    best_bandwidth = max(bandwidth.values())
    calls, info = build_competitors(device)
    samples = interleave(calls, reps=args.reps, warmup=args.warmup, device=device)
    reference_median = 1e3 * statistics.median(samples[REFERENCE])
    rows = {label: summarise(values, reference_median) for label, values in samples.items()}
    limit_ms = 1e3 * BYTES_PER_ELEMENT * info["elements"] / (best_bandwidth * 1e9)
    ratio = rows["ShardedEMA.update"]["ratio_to_torch"]

    print(f"EMA update, decay {DECAY}: {info['tensors']} tensors, {info['elements'] / 1e6:.2f}M float32 "
          f"elements ({info['buckets']} flat bucket(s), {info['sharded_ema_elements'] / 1e6:.2f}M averaged "
          f"by ShardedEMA incl. padding); {args.reps} interleaved rounds on {device}")
    print("memory bandwidth: " + ", ".join(f"{name} {gbps:.1f} GB/s" for name, gbps in bandwidth.items())
          + f"; limit = {BYTES_PER_ELEMENT} B x elements / {best_bandwidth:.1f} GB/s = {limit_ms:.2f} ms")
    header = f"{'':<27} {'median ms':>10} {'p25-p75 ms':>14} {'/torch':>7} {'/limit':>7}"
    print(header)
    print("-" * len(header))
    for label, row in rows.items():
        spread = f"{row['p25_ms']:.2f}-{row['p75_ms']:.2f}"
        print(f"{label:<27} {row['median_ms']:>10.2f} {spread:>14} {row['ratio_to_torch']:>7.2f} "
              f"{row['median_ms'] / limit_ms:>7.2f}")
    print(f"{'memory limit':<27} {limit_ms:>10.2f}")
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"target ShardedEMA.update <= {TARGET_RATIO} x torch: {ratio:.2f} ({verdict})")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(device), "decay": DECAY, "reps": args.reps, "warmup": args.warmup, **info,
        "bandwidth_gbps": bandwidth, "limit_ms": limit_ms, "bytes_per_element": BYTES_PER_ELEMENT,
        "target_ratio": TARGET_RATIO, "ratio": ratio, "target_met": ratio <= TARGET_RATIO, "rows": rows,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
