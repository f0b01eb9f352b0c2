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

from .errors import CheckpointFormatError

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
    """Raise ``CheckpointFormatError`` naming ``where`` unless ``restore_rng`` takes these states:
    each is set on a throwaway generator of its kind, which checks it as the real one would."""
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{where}: expected an object of generator states")
    checks = {"torch": lambda: torch.Generator().set_state(tensors["cpu"])}
    checks.update({name: lambda s=state: torch.Generator().set_state(s) for name, state in tensors.items()
                   if name.startswith("cuda")})
    checks["python"] = lambda: random.Random().setstate(_python_state(data["python"]))
    if numpy is not None and data.get("numpy") is not None:
        checks["numpy"] = lambda: numpy.random.RandomState().set_state(_numpy_state(data["numpy"]))
    for kind, check in checks.items():
        try:
            check()
        except Exception as error:  # noqa: BLE001 - any way a state can be wrong
            raise CheckpointFormatError(f"{where}: the {kind} generator state is not one: {error}") from None


def _python_state(data: Any) -> tuple:
    version, internal, gauss = data
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in internal):
        raise TypeError("the Mersenne Twister state must be integers")
    return version, tuple(internal), gauss


def _numpy_state(data: Any) -> tuple:
    kind, keys, position, has_gauss, cached = data
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in keys):
        raise ValueError("the Mersenne Twister keys must be 32-bit unsigned integers")
    return kind, numpy.asarray(keys, dtype=numpy.uint32), position, has_gauss, cached


def restore_rng(tensors: dict[str, Tensor], data: dict[str, Any]) -> None:
    """Put generator states back (``check_rng`` them first); CUDA ones only for devices present."""
    torch.set_rng_state(tensors["cpu"])
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            state = tensors.get(f"cuda{device}")
            if state is not None:
                torch.cuda.set_rng_state(state, device)
    random.setstate(_python_state(data["python"]))
    if numpy is not None and data.get("numpy") is not None:
        numpy.random.set_state(_numpy_state(data["numpy"]))
