"""``compare(a, b)``: which values of two checkpoints differ, and by how much ("did my resume match?").

Both checkpoints are consolidated first (:mod:`.consolidate`), so they compare across world sizes:
the model's ``state_dict()`` per key, the optimizer's torch-format state per (parameter, state name),
the EMA's averaged weights per key; and the JSON parts: the step, hyper-parameters per param group,
scheduler states, the EMA's counters, ``extra``, and (at equal world sizes) every rank's RNG states.

Tensors are close when ``|a - b| <= atol + rtol * |b|`` element-wise (NaN equals NaN, ``inf`` equals
``inf`` of the same sign), the default tolerances being 0: bit-for-bit equal values. Numbers inside
the JSON parts use the same test. A difference in shape, dtype or presence is always a difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .consistency import check_consistency
from .consolidate import ema_state, model_state, optimizer_state
from .manifest import rng_key
from .reader import Checkpoint, open_checkpoint

_MISSING = object()


@dataclass
class TensorDifference:
    """One tensor that differs: where it is, how many elements are not close and the largest errors."""

    section: str  # "model", "optimizer", "ema", "rng"
    key: str
    numel: int
    count: int  # elements that are not close (all of them when shapes differ or one side lacks it)
    max_abs: float | None = None
    max_rel: float | None = None
    note: str | None = None


@dataclass
class ValueDifference:
    """A JSON value that differs: its path (``param_groups[0].lr``) and both sides (None: absent)."""

    section: str  # "step", "hyperparameters", "schedulers", "ema", "extra", "rng", "optimizer"
    path: str
    a: Any
    b: Any


@dataclass
class Comparison:
    """Everything ``compare`` found; ``equal`` when nothing differs beyond the tolerances."""

    a: str
    b: str
    world_sizes: tuple[int, int]
    rtol: float
    atol: float
    tensors_compared: int = 0
    tensors: list[TensorDifference] = field(default_factory=list)
    values: list[ValueDifference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.tensors and not self.values

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "world_sizes": list(self.world_sizes), "rtol": self.rtol, "atol": self.atol,
            "equal": self.equal, "tensors_compared": self.tensors_compared,
            "tensors": [asdict(d) for d in self.tensors], "values": [asdict(d) for d in self.values],
            "notes": self.notes,
        }


def compare(
    a: str, b: str, *, rtol: float = 0.0, atol: float = 0.0, storage_options: dict[str, Any] | None = None,
) -> Comparison:
    """Compare the checkpoints at ``a`` and ``b`` value by value (module docstring); reads both whole."""
    if not (math.isfinite(rtol) and math.isfinite(atol) and rtol >= 0 and atol >= 0):
        raise ValueError(f"rtol and atol must be finite and >= 0, got rtol={rtol!r}, atol={atol!r}")
    left, right = open_checkpoint(a, storage_options), open_checkpoint(b, storage_options)
    check_consistency(left)
    check_consistency(right)
    result = Comparison(left.url, right.url, (left.manifest.world_size, right.manifest.world_size), rtol, atol)
    _Comparer(result).run(left, right)
    return result


class _Comparer:
    def __init__(self, result: Comparison) -> None:
        self.result = result

    def run(self, left: Checkpoint, right: Checkpoint) -> None:
        ma, mb = left.manifest, right.manifest
        self.values("step", "step", ma.step, mb.step)
        self.values("step", "metric", ma.metric, mb.metric)
        self.tensor_maps("model", model_state(left), model_state(right))
        self.optimizers(left, right)
        self.tensor_maps("ema", ema_state(left), ema_state(right))
        self.values("ema", "ema", ma.ema, mb.ema)
        self.values("schedulers", "schedulers", ma.schedulers, mb.schedulers)
        self.values("extra", "extra", ma.extra, mb.extra)
        if ma.world_size == mb.world_size:
            self.values("rng", "rng", ma.rng, mb.rng)
            for rank in range(min(len(ma.rng), len(mb.rng))):
                self.tensor_maps("rng", _rng_tensors(left, rank), _rng_tensors(right, rank))
        else:
            self.result.notes.append(
                f"RNG states not compared: the world sizes differ ({ma.world_size} and {mb.world_size})"
            )

    # -- tensors ------------------------------------------------------------------------------------

    def tensor_maps(self, section: str, a: Mapping[str, Tensor] | None, b: Mapping[str, Tensor] | None) -> None:
        if a is None and b is None:
            return
        if a is None or b is None:
            self.result.values.append(ValueDifference(section, section, None if a is None else f"{len(a)} tensors",
                                                      None if b is None else f"{len(b)} tensors"))
            return
        for key in [*a, *(k for k in b if k not in a)]:
            self.tensors(section, key, a.get(key), b.get(key))

    def tensors(self, section: str, key: str, a: Tensor | None, b: Tensor | None) -> None:
        self.result.tensors_compared += 1
        if a is None or b is None:
            present = a if a is not None else b
            self.result.tensors.append(TensorDifference(section, key, present.numel(), present.numel(),
                                                        note=f"only in {'A' if b is None else 'B'}"))
            return
        if a.shape != b.shape:
            self.result.tensors.append(TensorDifference(
                section, key, max(a.numel(), b.numel()), max(a.numel(), b.numel()),
                note=f"shape {list(a.shape)} vs {list(b.shape)}"))
            return
        count, max_abs, max_rel = _differences(a, b, self.result.rtol, self.result.atol)
        note = None if a.dtype == b.dtype else f"dtype {_dtype(a)} vs {_dtype(b)}"
        if count or note:
            self.result.tensors.append(TensorDifference(section, key, a.numel(), count, max_abs, max_rel, note))

    def optimizers(self, left: Checkpoint, right: Checkpoint) -> None:
        a, b = optimizer_state(left), optimizer_state(right)
        if a is None or b is None:
            if (a is None) != (b is None):
                self.values("optimizer", "optimizer", None if a is None else "present", None if b is None else "present")
            return
        self.values("optimizer", "algorithm", left.manifest.optimizer["algorithm"], right.manifest.optimizer["algorithm"])
        self.values("hyperparameters", "param_groups", a["param_groups"], b["param_groups"])
        names = {p["index"]: p.get("name") for p in left.manifest.params}
        names.update({p["index"]: p.get("name") for p in right.manifest.params if names.get(p["index"]) is None})
        for index in sorted(a["state"].keys() | b["state"].keys()):
            where = f"{index}" + (f" ({names[index]})" if names.get(index) else "")
            entry_a, entry_b = a["state"].get(index, {}), b["state"].get(index, {})
            for name in [*entry_a, *(n for n in entry_b if n not in entry_a)]:
                self.state_value(f"{where}.{name}", entry_a.get(name, _MISSING), entry_b.get(name, _MISSING))

    def state_value(self, key: str, a: Any, b: Any) -> None:
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            self.tensors("optimizer", key, a if isinstance(a, Tensor) else None, b if isinstance(b, Tensor) else None)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(
                isinstance(v, Tensor) for v in [*a, *b]):
            for i, (x, y) in enumerate(zip(a, b)):
                self.state_value(f"{key}[{i}]", x, y)
        else:
            self.values("optimizer", key, None if a is _MISSING else a, None if b is _MISSING else b)

    # -- JSON data ----------------------------------------------------------------------------------

    def values(self, section: str, path: str, a: Any, b: Any) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in [*a, *(k for k in b if k not in a)]:
                self.values(section, f"{path}.{key}", a.get(key), b.get(key))
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                self.values(section, f"{path}[{i}]", x, y)
        elif not self.close(a, b):
            self.result.values.append(ValueDifference(section, path, _plain(a), _plain(b)))

    def close(self, a: Any, b: Any) -> bool:
        numbers = (int, float)
        if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
            if math.isnan(a) or math.isnan(b):
                return math.isnan(a) and math.isnan(b)
            if a == b:
                return True
            return abs(a - b) <= self.result.atol + self.result.rtol * abs(b)
        return type(a) is type(b) and a == b


def _rng_tensors(checkpoint: Checkpoint, rank: int) -> dict[str, Tensor]:
    return {rng_key(rank, name): state for name, state in checkpoint.read_rng(rank).items()}


def _differences(a: Tensor, b: Tensor, rtol: float, atol: float) -> tuple[int, float, float]:
    """(elements not close, max |a - b|, max |a - b| / |b|) of two tensors of one shape."""
    if a.numel() == 0:
        return 0, 0.0, 0.0
    exact = not (a.is_floating_point() or a.is_complex() or b.is_floating_point() or b.is_complex())
    if exact:
        x, y = a.to(torch.int64), b.to(torch.int64)
        diff = (x - y).abs().to(torch.float64)
        scale = y.abs().to(torch.float64)
    else:
        wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
        x, y = a.detach().to(wide), b.detach().to(wide)
        diff = (x - y).abs().to(torch.float64)
        nan_x, nan_y = torch.isnan(x), torch.isnan(y)
        diff = torch.where(nan_x & nan_y, 0.0, diff)
        diff = torch.where(nan_x ^ nan_y, math.inf, diff)
        diff = torch.where(x == y, 0.0, diff)  # inf == inf
        scale = y.abs().to(torch.float64)
    not_close = diff > atol + rtol * scale
    relative = torch.where(diff == 0, 0.0, diff / scale)  # x/0 -> inf where they differ
    return int(not_close.sum()), float(diff.max()), float(relative.max())


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
