"""Scheduler state as JSON-ready data, and back.

Checkpoints keep scheduler state as JSON, so ``state_dict()`` holds only numbers, strings, booleans,
``None``, lists and string-keyed dicts (floats may be ``inf``, which Python's ``json`` writes as
``Infinity``). Tensors (a tensor lr) become numbers; loading turns them back into tensors wherever
the live scheduler holds a tensor, so the types a scheduler was built with survive a round trip.
Loading also accepts torch's own format, tensors included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def to_plain(value: Any) -> Any:
    """``value`` with tensors turned into numbers (or nested lists) and tuples into lists."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def like(template: Any, value: Any) -> Any:
    """``value`` in ``template``'s form: a tensor where ``template`` is one, element-wise in lists and
    tuples (a tuple again where ``template`` is one: JSON has only lists)."""
    if isinstance(template, Tensor):
        return torch.as_tensor(to_plain(value), dtype=template.dtype, device=template.device).clone()
    if isinstance(template, (list, tuple)) and isinstance(value, (list, tuple)) and len(template) == len(value):
        return type(template)(like(t, v) for t, v in zip(template, value, strict=True))
    return to_plain(value)
