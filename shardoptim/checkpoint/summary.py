"""``summarize(checkpoint)``: what a checkpoint holds, as JSON data, from its manifest alone.

What ``shardoptim inspect`` prints: the save (step, world size, save id), the optimizer (algorithm,
groups and their hyper-parameters), the parameter table, the buckets with their padding and every
rank's range, the model's keys, the files with their sizes and digests, and short summaries of the
schedulers, the EMA, the RNG states and ``extra``. No tensor is read.
"""

from __future__ import annotations

import math
from typing import Any

from .manifest import VERSION, rng_key, shard_file, shared_file
from .reader import Checkpoint
from .safetensors_header import SAFETENSORS_DTYPES


def summarize(checkpoint: Checkpoint) -> dict[str, Any]:
    """The checkpoint's contents as JSON data (see the module docstring); reads only the manifest."""
    manifest = checkpoint.manifest
    bucket_of = {slot.index: position for position, bucket in enumerate(checkpoint.buckets)
                 for slot in bucket.layout.slots}
    steps_of = {slot.index: bucket.steps[i] for bucket in checkpoint.buckets
                for i, slot in enumerate(bucket.layout.slots)}
    return {
        "url": checkpoint.url,
        "format_version": VERSION,
        "save_id": manifest.save_id,
        "world_size": manifest.world_size,
        "step": manifest.step,
        "metric": manifest.metric,
        "topology": manifest.topology,
        "optimizer": _optimizer(checkpoint),
        "parameters": [
            {
                "index": p["index"], "group": p["group"], "name": p.get("name"), "shape": p["shape"],
                "dtype": p["dtype"], "numel": math.prod(p["shape"]), "bucket": bucket_of.get(p["index"]),
                "steps": steps_of.get(p["index"]),
            }
            for p in manifest.params
        ],
        "buckets": [_bucket(position, bucket) for position, bucket in enumerate(checkpoint.buckets)],
        "model": _model(checkpoint),
        "files": [
            {"name": name, "size": record.size, "digest": record.digest, "tensors": len(record.tensors)}
            for name, record in sorted(manifest.files.items())
        ],
        "total_bytes": sum(record.size for record in manifest.files.values()),
        "schedulers": [_scheduler(state) for state in manifest.schedulers],
        "ema": manifest.ema,
        "rng": _rng(checkpoint),
        "extra": manifest.extra,
    }


def _optimizer(checkpoint: Checkpoint) -> dict[str, Any] | None:
    saved = checkpoint.manifest.optimizer
    if saved is None:
        return None
    groups = []
    for group in saved.get("param_groups", []):
        hyper = {key: value for key, value in group.items() if key not in ("params", "param_names")}
        groups.append({"params": len(group.get("params", [])), "hyperparameters": hyper})
    sharded = any(bucket.layout.is_sharded for bucket in checkpoint.buckets)
    return {
        "algorithm": saved.get("algorithm"),
        "format": "torch" if saved.get("torch") else "shardoptim",
        "sharded": sharded,
        "shardable": saved.get("shardable"),
        "bucket_cap_numel": saved.get("bucket_cap_numel"),
        "param_groups": groups,
        "per_parameter": sorted(saved.get("per_parameter", {}), key=lambda k: (len(k), k)),
    }


def _bucket(position: int, bucket: Any) -> dict[str, Any]:
    layout = bucket.layout
    return {
        "index": position,
        "group": layout.group,
        "dtype": str(layout.dtype).removeprefix("torch."),
        "device": str(layout.device),
        "trainable": layout.trainable,
        "params": [slot.index for slot in layout.slots],
        "numel": layout.numel,
        "used": layout.used,
        "padding": layout.numel - sum(slot.numel for slot in layout.slots),
        "ranks": [list(bound) for bound in layout.bounds],
        "state": list(bucket.names),
        "scalars": sorted(bucket.scalars),
    }


def _model(checkpoint: Checkpoint) -> dict[str, Any] | None:
    saved = checkpoint.manifest.model
    if saved is None:
        return None
    shared = checkpoint.manifest.files.get(shared_file(checkpoint.manifest.save_id))
    records = {t.name: t for t in shared.tensors} if shared is not None else {}
    params = {p["index"]: p for p in checkpoint.manifest.params}
    entries = []
    for key, entry in saved.get("entries", {}).items():
        if "param" in entry:
            p = params.get(entry["param"], {})
            entries.append({"key": key, "kind": "optimizer parameter", "param": entry["param"],
                            "shape": p.get("shape"), "dtype": p.get("dtype")})
        elif "same_as" in entry:
            entries.append({"key": key, "kind": "tied", "same_as": entry["same_as"]})
        else:
            record = records.get(entry.get("tensor"))
            entries.append({"key": key, "kind": "tensor",
                            "shape": list(record.shape) if record else None,
                            "dtype": _dtype_name(record.dtype) if record else None, "complex": bool(entry.get("complex"))})
    return {"keys": len(entries), "entries": entries}


def _scheduler(state: Any) -> dict[str, Any]:
    if not isinstance(state, dict):
        return {"state": state}
    shown = {key: state[key] for key in ("last_epoch", "_last_lr", "_step_count", "best", "num_bad_epochs")
             if key in state}
    return {"keys": sorted(state), **shown}



def _dtype_name(code: str) -> str:
    dtype = SAFETENSORS_DTYPES.get(code)
    return str(dtype).removeprefix("torch.") if dtype is not None else code


def _rng(checkpoint: Checkpoint) -> dict[str, Any]:
    """How many ranks' generator states are saved, and which generators (JSON ones and tensors)."""
    manifest = checkpoint.manifest
    first = manifest.rng[0] if manifest.rng and isinstance(manifest.rng[0], dict) else {}
    record = manifest.files.get(shard_file(0, manifest.world_size, manifest.save_id))
    prefix = rng_key(0, "")
    tensors = [t.name.removeprefix(prefix) for t in record.tensors if t.name.startswith(prefix)] if record else []
    return {"ranks": len(manifest.rng), "generators": sorted(tensors) + sorted(first)}
