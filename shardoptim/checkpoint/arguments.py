"""The checks ``save`` and ``load`` make of their arguments before touching storage or live state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..ema import AveragedModel, ShardedEMA
from .manifest import MAX_RUN_CHARS

_MAX_STEP = 1 << 62


def check_components(model: Any, optimizer: Any, schedulers: Any, ema: Any) -> None:
    """``TypeError`` naming the argument for anything that is not what a checkpoint holds."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if isinstance(schedulers, (str, bytes)) or not isinstance(schedulers, Sequence):
        raise TypeError(f"schedulers must be a list of schedulers, got {type(schedulers).__name__}")
    for index, scheduler in enumerate(schedulers):
        if not (callable(getattr(scheduler, "state_dict", None)) and callable(getattr(scheduler, "load_state_dict", None))):
            raise TypeError(f"schedulers[{index}] must be a scheduler (with state_dict/load_state_dict), "
                            f"got {type(scheduler).__name__}")
    if ema is not None and not isinstance(ema, (ShardedEMA, AveragedModel, torch.optim.swa_utils.AveragedModel)):
        raise TypeError(f"ema must be a ShardedEMA, an AveragedModel or None, got {type(ema).__name__}")


def check_records(step: Any, metric: Any, run: Any) -> None:
    """What ``save`` records in the manifest must read back: refused here, not at the next load."""
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < _MAX_STEP):
        raise ValueError(f"step must be a non-negative int or None, got {step!r}")
    if metric is not None and (isinstance(metric, bool) or not isinstance(metric, (int, float))
                               or not math.isfinite(metric)):
        raise ValueError(f"metric must be a finite number or None, got {metric!r}")
    if run is not None and (not isinstance(run, str) or len(run) > MAX_RUN_CHARS):
        raise ValueError(f"run must be a string of at most {MAX_RUN_CHARS} characters or None, got {run!r:.80}")
