"""Random number generator states of one rank: torch's (CPU and every CUDA device), Python's, NumPy's.

torch's states are byte tensors, saved in the rank's file; Python's and NumPy's are numbers, saved as
JSON data in the manifest. Restoring them is what makes dropout and data order of a resumed run
repeat the uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

try:
    import numpy
except ImportError:  # pragma: no cover - numpy is a dependency
    numpy = None


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's generator states: ``(tensors by name, JSON data)``."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{device}"] = state
    version, internal, gauss = random.getstate()
    data: dict[str, Any] = {"python": [version, list(internal), gauss]}
    if numpy is not None:
        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        data["numpy"] = [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]
    return tensors, data


def check_rng(tensors: dict[str, Tensor], data: Any, *, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``tensors`` and ``data`` are states ``restore_rng`` takes."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object of generator states")
    if "cpu" not in tensors or tensors["cpu"].dtype != torch.uint8 or tensors["cpu"].dim() != 1:
        raise ValueError(f"{where}: no CPU generator state (a 1-D uint8 tensor)")
    python = data.get("python")
    if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in python[1])):
        raise ValueError(f"{where}: the Python generator state is malformed")
    state = data.get("numpy")
    if state is not None and not (isinstance(state, list) and len(state) == 5 and isinstance(state[1], list)):
        raise ValueError(f"{where}: the NumPy generator state is malformed")


def restore_rng(tensors: dict[str, Tensor], data: dict[str, Any]) -> None:
    """Put generator states back (``check_rng`` them first); CUDA ones only for devices present."""
    torch.set_rng_state(tensors["cpu"])
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            state = tensors.get(f"cuda{device}")
            if state is not None:
                torch.cuda.set_rng_state(state, device)
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    if numpy is not None and data.get("numpy") is not None:
        kind, keys, position, has_gauss, cached = data["numpy"]
        numpy.random.set_state((kind, numpy.asarray(keys, dtype=numpy.uint32), position, has_gauss, cached))
