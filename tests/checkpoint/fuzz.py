"""Hostile checkpoints: a real checkpoint, mutated at random, fed to ``load``.

``python -m tests.checkpoint.fuzz DIR CASES SEED`` writes a small real checkpoint under DIR, then runs
CASES mutations of it, each in a fresh copy: the manifest's JSON (a field deleted, a value swapped
for another type or an extreme number, a list reordered), its raw bytes (flipped, truncated), and
a rank file's safetensors header (edited and re-recorded in the manifest, so the header parser
itself is reached, not only the CRC that guards it). Every case must either load or be refused
with a checkpoint error, and a refusal must leave the live model, optimizer, scheduler and EMA as
they were. It runs under an address-space limit, so an allocation proportional to a claimed size
shows up as a ``MemoryError``. Prints one JSON summary line: counts per outcome.
"""

from __future__ import annotations

import copy
import json
import random
import resource
import shutil
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shardoptim
from shardoptim import checkpoint
from shardoptim.checkpoint.manifest import MANIFEST

#: Refusals a hostile checkpoint may cause: checkpoint errors (ValueError) and missing or short files.
CLEAN_REFUSALS = (ValueError, FileNotFoundError, EOFError)
EXTREMES: list[Any] = [None, True, -1, 0, 2**31, 2**63, -(2**63), 1e308, -1e308, 0.5, "", "x" * 1000, [], {},
                       [[[[[]]]]], {"a": {"b": {"c": {}}}}, "../../etc/passwd", "/abs", "s3://elsewhere/x"]


def build() -> tuple[nn.Module, Any, Any, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 3))
    opt = shardoptim.AdamW(model.parameters(), lr=0.01)
    sched = shardoptim.sched.ReduceLROnPlateau(opt)
    ema = shardoptim.ema.ShardedEMA(opt, decay=0.9)
    return model, opt, sched, ema


def state_of(model: nn.Module, opt: Any, sched: Any, ema: Any) -> list[Any]:
    return [copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), sched.state_dict(),
            [s.clone() for s in ema.shards], ema.num_updates]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN


def write_original(directory: Path) -> Path:
    model, opt, sched, ema = build()
    for _ in range(2):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step(1.0)
        ema.update()
    url = directory / "original"
    checkpoint.save(str(url), model=model, optimizer=opt, schedulers=[sched], ema=ema, extra={"epoch": 1})
    return url


# -- mutations ---------------------------------------------------------------------------------------


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += _paths(value, prefix + (index,))
    return found


def _parent(tree: Any, path: tuple) -> tuple[Any, Any]:
    for step in path[:-1]:
        tree = tree[step]
    return tree, path[-1]


def mutate_manifest_tree(tree: Any, rng: random.Random) -> str:
    section = rng.choice(sorted(tree))  # each part of the manifest as often as any other, whatever its size
    path = rng.choice(_paths(tree[section], (section,)))
    parent, key = _parent(tree, path)
    kind = rng.choice(["delete", "replace", "replace", "shuffle", "duplicate"])
    if kind == "delete" and isinstance(parent, dict):
        del parent[key]
    elif kind == "shuffle" and isinstance(parent[key], list) and len(parent[key]) > 1:
        rng.shuffle(parent[key])
    elif kind == "duplicate" and isinstance(parent[key], list) and parent[key]:
        parent[key].append(copy.deepcopy(parent[key][0]))
    else:
        original = parent[key]
        if isinstance(original, int) and not isinstance(original, bool) and rng.random() < 0.5:
            parent[key] = original + rng.choice([-1, 1, 16, -(2**40), 2**40])
        else:
            parent[key] = copy.deepcopy(rng.choice(EXTREMES))
    return f"{kind} {'/'.join(map(str, path))}"


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(data)
    if rng.random() < 0.2:
        cut = rng.randrange(len(data))
        return bytes(data[:cut]), f"truncate at {cut}"
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data), "flip bytes"


def mutate_header(directory: Path, manifest: dict, rng: random.Random) -> str:
    """Edit a rank file's safetensors header, then record the new header CRC and size in the manifest."""
    name = next(n for n in manifest["files"] if n.startswith("rank"))
    path = directory / name
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    field = rng.choice(["dtype", "shape", "data_offsets", "delete", "huge"])
    if field == "delete":
        del header[key]
    elif field == "huge":
        header[key]["shape"] = [2**40, 2**20]
    elif field == "dtype":
        header[key]["dtype"] = rng.choice(["F64", "I8", "BOGUS", "F8_E4M3"])
    elif field == "shape":
        header[key]["shape"] = [rng.choice([0, 1, 3, 10**6])] + header[key]["shape"][1:]
    else:
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin + rng.choice([-8, 8, 1]), end + rng.choice([0, 8, 2**30])]
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    new = struct.pack("<Q", len(body)) + body + raw[8 + length :]
    path.write_bytes(new)
    record = manifest["files"][name]
    record["size"] = len(new)
    record["header_crc32"] = zlib.crc32(new[: 8 + len(body)])
    return f"header {key}.{field}"


def one_case(original: Path, work: Path, rng: random.Random) -> str:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(original, work)
    manifest_path = work / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    choice = rng.random()
    if choice < 0.55:
        what = mutate_manifest_tree(manifest, rng)
        manifest_path.write_text(json.dumps(manifest))
    elif choice < 0.75:
        data, what = mutate_bytes(manifest_path.read_bytes(), rng)
        manifest_path.write_bytes(data)
    else:
        what = mutate_header(work, manifest, rng)
        manifest_path.write_text(json.dumps(manifest))
    return what


def run(directory: Path, cases: int, seed: int) -> dict[str, Any]:
    original = write_original(directory)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), hard))  # 2 GiB beyond what is used now
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    for case in range(cases):
        what = one_case(original, directory / "case", rng)
        live = build()
        before = state_of(*live)
        model, opt, sched, ema = live
        try:
            checkpoint.load(str(directory / "case"), model=model, optimizer=opt, schedulers=[sched], ema=ema)
            outcomes["loaded"] += 1
        except CLEAN_REFUSALS as error:
            outcomes[f"refused: {type(error).__name__}"] += 1
            if not same(state_of(*live), before):
                problems.append(f"case {case} ({what}): refused ({error}) but the live state changed")
        except BaseException as error:  # noqa: BLE001 - every other outcome is a finding
            outcomes[f"crashed: {type(error).__name__}"] += 1
            problems.append(f"case {case} ({what}): {type(error).__name__}: {str(error)[:300]}")
    return {"cases": cases, "outcomes": dict(outcomes), "problems": problems}


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
