"""Checkpoint I/O benchmark: our streaming safetensors writer/reader against dd and torch.save/torch.load.

Run from the repository root::

    python -m bench.ckpt_io                        # 400 MiB, 5 rounds: about a minute on 2 cores
    python -m bench.ckpt_io --mib 200 --reps 3 --dir /mnt/fast --json /tmp/ckpt_io.json

The same tensors (``--mib`` MiB of float32 in four tensors, optimizer-state-like: two large, two
small) are written, durable, to files in ``--dir`` (default: ``bench/results/ckpt_io_tmp``, on the
repository's disk) by every competitor, in rounds, each round in a new random order:

- ``dd``: ``dd if=/dev/zero of=FILE bs=1M count=MIB conv=fdatasync`` (the issue's reference);
- ``ours``: ``write_tensor_file`` on a local ``Storage`` (temp file, fsync, rename, directory
  fsync; a CRC32 per 4 MiB block and a CRC32 file digest, computed as it writes);
- ``ours sha256``: the same with a sha256 file digest;
- ``torch.save+fsync``: ``torch.save`` of the dict, then ``os.fsync`` of the file.

Then reads of those files, from the page cache (the files were just written; dropping the cache
would disturb other users of the machine): ``ours`` (``TensorFileReader.read_all`` with the record,
every block CRC-checked), ``ours unchecked`` (no record) and ``torch.load(weights_only=True)``.
The table gives medians over ``--reps`` rounds, MB/s, and each row's ratio to its reference (dd for
writes, torch.load for reads). Last, the throughput on one core of the hashes a file digest could
use (zlib.crc32, hashlib.sha256, hashlib.blake2b over 256 MiB in 8 MiB updates). Results and every
sample go to ``--json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shardoptim.checkpoint import digests
from shardoptim.checkpoint.storage import Storage
from shardoptim.checkpoint.tensorfile_reader import TensorFileReader
from shardoptim.checkpoint.tensorfile_writer import write_tensor_file

RESULTS = Path(__file__).resolve().parent / "results"


def make_tensors(mib: int) -> dict[str, torch.Tensor]:
    """``mib`` MiB of float32: two large tensors (exp_avg, exp_avg_sq of a flat shard) and two small."""
    numel = mib * 2**20 // 4
    small = 4096
    large = (numel - 2 * small) // 2
    generator = torch.Generator().manual_seed(0)
    return {
        "params": torch.randn(small, generator=generator),
        "exp_avg": torch.randn(large, generator=generator),
        "exp_avg_sq": torch.rand(large, generator=generator),
        "step": torch.full((small,), 1000.0),
    }


def run_dd(path: Path, mib: int) -> float:
    result = subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fdatasync"],
        capture_output=True, text=True, check=True,
    )
    match = re.search(r"copied, ([0-9.]+) s", result.stderr)
    if match is None:
        raise RuntimeError(f"could not read dd's time from: {result.stderr}")
    return float(match.group(1))


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_save_fsync(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())


def hash_throughputs(reps: int) -> dict[str, float]:
    """GiB/s of each hash over 256 MiB of random bytes in 8 MiB updates, the median of ``reps`` runs."""
    data = memoryview(os.urandom(256 * 2**20))
    step = 8 * 2**20

    def crc32() -> None:
        crc = 0
        for start in range(0, len(data), step):
            crc = zlib.crc32(data[start : start + step], crc)

    def hashlib_run(name: str) -> Callable[[], None]:
        def run() -> None:
            h = hashlib.new(name)
            for start in range(0, len(data), step):
                h.update(data[start : start + step])
        return run

    def crc32_in_use() -> None:
        crc = 0
        for start in range(0, len(data), step):
            crc = digests.crc32(data[start : start + step], crc)

    runs = {"zlib.crc32": crc32, "hashlib.sha256": hashlib_run("sha256"), "hashlib.blake2b": hashlib_run("blake2b")}
    if digests.crc32 is not zlib.crc32:
        runs[f"{digests.crc32.__module__}.crc32 (in use)"] = crc32_in_use
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(timed(run))
    return {name: len(data) / statistics.median(values) / 2**30 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=400)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=RESULTS / "ckpt_io_tmp")
    parser.add_argument("--json", type=Path, default=RESULTS / "ckpt_io.json")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    storage = Storage(str(args.dir))
    tensors = make_tensors(args.mib)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    records: dict[str, Any] = {}

    def ours(digest: str) -> Callable[[], None]:
        def write() -> None:
            records[digest] = write_tensor_file(storage, f"ours-{digest}.safetensors", tensors, digest=digest)
        return write

    writers: dict[str, Callable[[], float]] = {
        "dd": lambda: run_dd(args.dir / "dd.bin", args.mib),
        "ours": lambda: timed(ours("crc32")),
        "ours sha256": lambda: timed(ours("sha256")),
        "torch.save+fsync": lambda: timed(lambda: torch_save_fsync(tensors, args.dir / "torch.pt")),
    }
    # Each writer's previous file is removed before it is timed: freeing 400 MiB of page cache is not
    # part of a save (and dd truncates its output before it starts its clock).
    outputs = {"dd": "dd.bin", "ours": "ours-crc32.safetensors", "ours sha256": "ours-sha256.safetensors", "torch.save+fsync": "torch.pt"}
    readers: dict[str, Callable[[], float]] = {
        "ours": lambda: timed(lambda: TensorFileReader(storage, "ours-crc32.safetensors", expected=records["crc32"]).read_all()),
        "ours unchecked": lambda: timed(lambda: TensorFileReader(storage, "ours-crc32.safetensors", expected=None).read_all()),
        "torch.load": lambda: timed(lambda: torch.load(args.dir / "torch.pt", weights_only=True)),
    }
    samples: dict[str, list[float]] = {f"write {k}": [] for k in writers} | {f"read {k}": [] for k in readers}
    rng = random.Random(0)
    for round_index in range(args.reps + 1):  # round 0 warms up (allocator, page cache, imports)
        for group, table in (("write", writers), ("read", readers)):
            order = list(table)
            rng.shuffle(order)
            for name in order:
                if group == "write":
                    (args.dir / outputs[name]).unlink(missing_ok=True)
                    os.sync()
                seconds = table[name]()
                if round_index:
                    samples[f"{group} {name}"].append(seconds)

    medians = {key: statistics.median(values) for key, values in samples.items()}
    references = {"write": medians["write dd"], "read": medians["read torch.load"]}
    print(f"{nbytes / 2**20:.0f} MiB in {len(tensors)} tensors, {args.reps} rounds, files in {args.dir}")
    print(f"{'':28s} {'median s':>9s} {'MB/s':>8s} {'vs ref':>7s}")
    for key, seconds in medians.items():
        group = key.split()[0]
        speed_ratio = references[group] / seconds
        print(f"{key:28s} {seconds:9.3f} {nbytes / seconds / 1e6:8.0f} {speed_ratio:6.2f}x")
    print("(vs ref: speed relative to dd for writes, to torch.load for reads; >1 is faster)")
    hashes = hash_throughputs(args.reps)
    print("hashes on one core: " + ", ".join(f"{name} {speed:.2f} GiB/s" for name, speed in hashes.items()))

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "bytes": nbytes, "reps": args.reps, "dir": str(args.dir), "machine": platform.platform(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "medians_s": medians, "samples_s": samples, "hash_gib_s": hashes,
    }, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
