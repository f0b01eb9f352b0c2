"""``convert(source, out)``: a torch.optim state dict, or a DCP checkpoint, as a shardoptim checkpoint.

Sources:

- a file written by ``torch.save``: a torch.optim ``state_dict()`` (index-keyed, or FQN-keyed as
  ``get_optimizer_state_dict`` makes it), or a dict holding one under ``optimizer``/``optim``/
  ``optimizer_state_dict`` next to a model state dict under ``model``/``model_state_dict``. Read
  with ``torch.load(weights_only=True)``: plain data and tensors, nothing else is unpickled;
- a torch.distributed.checkpoint directory of ``{"model": ..., "optim": ...}`` saved with
  ``get_model_state_dict``/``get_optimizer_state_dict`` (:mod:`.dcp_reader`).

``model_state`` (a ``torch.save``d model state dict or a safetensors file) gives parameter names,
shapes and dtypes where the optimizer state lacks them (a parameter without state) and is saved as
the checkpoint's model. The result is a checkpoint of one rank whose optimizer entry is in torch's
format (``"torch": true``): ``shardoptim.checkpoint.load`` puts it into a shardoptim or a torch.optim
optimizer of that algorithm, at any world size (the optimizer's own ``load_state_dict`` shards it).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from torch import Tensor

from ..sched.state import to_plain
from .capture import TENSOR, storable
from .dcp_reader import is_dcp_directory, read_dcp
from .errors import CheckpointFormatError
from .manifest import MANIFEST, Manifest, shard_file, shared_file
from .progress import SILENT, Progress
from .storage import Storage
from .tensorfile_reader import TensorFileReader
from .tensorfile_writer import write_tensor_file
from .torch_optim import ALGORITHMS, infer_algorithm

#: State tensors that torch.optim keeps shaped like their parameter, by which a parameter's shape is known.
PARAM_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                      "sum", "exp_inf", "ax", "grad_avg", "prev", "step_size")
_OPTIMIZER_KEYS = ("optimizer", "optim", "optimizer_state_dict")
_MODEL_KEYS = ("model", "model_state_dict", "state_dict")


@dataclass
class ConvertResult:
    """What ``convert`` wrote: the new checkpoint's manifest, the algorithm, and remarks on the input."""

    url: str
    manifest: Manifest
    algorithm: str
    source_format: str  # "torch.save" or "dcp"
    notes: list[str] = field(default_factory=list)


def convert(
    source: str,
    out: str,
    *,
    algorithm: str | None = None,
    model_state: str | None = None,
    step: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress = SILENT,
) -> ConvertResult:
    """Write the optimizer (and model) state of ``source`` to ``out`` as a shardoptim checkpoint.

    ``algorithm`` (``"AdamW"``) is required when the param groups' keys do not tell it. ``step`` is
    recorded for ``latest()``; by default the optimizer's step when every parameter has the same.
    ``FileExistsError`` when a committed checkpoint is at ``out``; ``ValueError`` (or a
    ``CheckpointError``) naming what is wrong with an input.
    """
    notes: list[str] = []
    if is_dcp_directory(source):
        source_format = "dcp"
        optimizer, model = _split(read_dcp(source), source)
    else:
        source_format = "torch.save"
        optimizer, model = _split(read_torch_file(source, storage_options), source)
    if model_state is not None:
        model = read_model_state_file(model_state, storage_options)
    if model is not None:
        model = _tensors_only(model, notes)
    if optimizer is None:
        raise ValueError(f"{source}: holds no optimizer state dict (a dict with 'state' and 'param_groups')")
    state, groups, names = _indexed(optimizer, source)
    if algorithm is None:
        algorithm = infer_algorithm(groups)
        notes.append(f"algorithm inferred from the param groups: {algorithm}")
    elif algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
    params = _param_table(state, groups, names, model, source, notes)
    if step is None:
        step = _common_step(state)
    return _write(out, storage_options, algorithm=algorithm, state=state, groups=groups, params=params, model=model,
                  step=step, source_format=source_format, notes=notes, progress=progress)


# -- reading the inputs -----------------------------------------------------------------------------


def read_torch_file(path: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A ``torch.save``d file at any fsspec URL, loaded with ``weights_only=True`` onto the CPU."""
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise CheckpointFormatError(f"{path}: not a torch.save file that weights_only=True reads: {error}") from None
    except Exception as error:  # noqa: BLE001 - weights_only's refusals are UnpicklingErrors and more
        raise CheckpointFormatError(f"{path}: refused by torch.load(weights_only=True): "
                                    f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def read_model_state_file(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """A model state dict from a safetensors file (by its ``.safetensors`` name) or a ``torch.save``d one."""
    if path.endswith(".safetensors"):
        directory, name = path.rsplit("/", 1) if "/" in path else (".", path)
        reader = TensorFileReader(Storage(directory or "/", storage_options), name, expected=None)
        return reader.read_all()
    value = read_torch_file(path, storage_options)
    if isinstance(value, Mapping) and not all(isinstance(v, Tensor) for v in value.values()):
        nested = next((value[k] for k in _MODEL_KEYS if isinstance(value.get(k), Mapping)), None)
        value = nested if nested is not None else value
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: not a model state dict (a dict of tensors)")
    return dict(value)


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def _split(loaded: Any, source: str) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """(optimizer state dict, model state dict or None) of what a source file holds."""
    if _is_optimizer_state(loaded):
        return loaded, None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{source}: holds a {type(loaded).__name__}, not a state dict")
    optimizer = next((loaded[k] for k in _OPTIMIZER_KEYS if _is_optimizer_state(loaded.get(k))), None)
    model = next((loaded[k] for k in _MODEL_KEYS if isinstance(loaded.get(k), Mapping)), None)
    if optimizer is None:
        raise ValueError(f"{source}: no optimizer state dict in it (top-level keys {sorted(map(str, loaded))[:10]}); "
                         f"expected one at the top or under {' / '.join(_OPTIMIZER_KEYS)}")
    return optimizer, model


def _tensors_only(model: Mapping[str, Any], notes: list[str]) -> dict[str, Tensor]:
    kept = {str(k): v for k, v in model.items() if isinstance(v, Tensor)}
    skipped = [str(k) for k, v in model.items() if not isinstance(v, Tensor)]
    if skipped:
        notes.append(f"model keys that hold no tensor, left out: {skipped[:8]}")
    return kept


def _indexed(optimizer: Mapping[str, Any], source: str) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]],
                                                                   dict[int, str]]:
    """The state dict in torch's index-keyed form: (state, param_groups, names by index).

    A state dict keyed by parameter names (``get_optimizer_state_dict``: groups list names, state is
    keyed by them) is numbered as torch numbers parameters: in the groups' order.
    """
    groups = optimizer["param_groups"]
    raw_state = optimizer["state"]
    if isinstance(raw_state, list):  # an index-keyed state that went through DCP's list positions
        raw_state = {i: entry for i, entry in enumerate(raw_state) if entry is not None}
    if not isinstance(groups, list) or not groups or not all(isinstance(g, Mapping) for g in groups):
        raise ValueError(f"{source}: param_groups must be a non-empty list of dicts")
    if not isinstance(raw_state, Mapping):
        raise ValueError(f"{source}: state must be a dict")
    members = []
    for position, group in enumerate(groups):
        params = group.get("params")
        if not isinstance(params, (list, tuple)):
            raise ValueError(f"{source}: param_groups[{position}] has no list of params")
        members.append(list(params))
    flat = [p for params in members for p in params]
    names: dict[int, str] = {}
    packed: list[dict[str, Any]] = []
    if all(isinstance(p, str) for p in flat):
        number = {name: i for i, name in enumerate(dict.fromkeys(flat))}
        names = {i: name for name, i in number.items()}
        unknown = [k for k in raw_state if k not in number]
        if unknown:
            raise ValueError(f"{source}: state for {unknown[:4]}, which no param group lists")
        state = {number[k]: dict(v) for k, v in raw_state.items()}
        for group, params in zip(groups, members):
            packed.append({**{k: v for k, v in group.items() if k != "params"}, "params": [number[p] for p in params]})
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in flat):
        try:
            state = {int(k): dict(v) for k, v in raw_state.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{source}: state must be keyed by parameter index") from None
        unknown = sorted(set(state) - set(flat))
        if unknown:
            raise ValueError(f"{source}: state for parameter(s) {unknown[:8]}, which no param group lists")
        for group, params in zip(groups, members):
            packed.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
            for index, name in zip(params, group.get("param_names") or ()):
                names.setdefault(index, name)
    else:
        raise ValueError(f"{source}: param_groups' params must all be indices or all be names")
    if len(set(flat)) != len(flat):
        raise ValueError(f"{source}: a parameter is listed twice in the param groups")
    return state, packed, names


def _param_table(
    state: Mapping[int, Mapping[str, Any]], groups: list[dict[str, Any]], names: Mapping[int, str],
    model: Mapping[str, Tensor] | None, source: str, notes: list[str],
) -> list[dict[str, Any]]:
    order = [(index, position) for position, group in enumerate(groups) for index in group["params"]]
    if model is not None and not names:
        names = _names_by_position(order, state, model, notes)
    table = []
    for index, group in order:
        name = names.get(index)
        from_state = next((v for k, v in state.get(index, {}).items()
                           if k in PARAM_SHAPED_STATE and isinstance(v, Tensor)), None)
        from_model = model.get(name) if model is not None and name is not None else None
        known = from_model if from_model is not None else from_state
        if known is None:
            raise ValueError(
                f"{source}: parameter {index}{f' ({name!r})' if name else ''} has no state to tell its shape; "
                + ("the model state has no such key" if model is not None else "pass --model-state")
            )
        if from_model is not None and from_state is not None and from_state.shape != from_model.shape:
            raise ValueError(f"{source}: parameter {index} ({name!r}) has state of shape {list(from_state.shape)}, "
                             f"the model's {name!r} {list(from_model.shape)}")
        table.append({"index": index, "group": group, "name": name, "shape": list(known.shape),
                      "dtype": str(known.dtype).removeprefix("torch.")})
    return table


def _names_by_position(order: list[tuple[int, int]], state: Mapping[int, Mapping[str, Any]],
                       model: Mapping[str, Tensor], notes: list[str]) -> dict[int, str]:
    """Names for an index-keyed state dict from a model state dict: its floating-point tensors in
    order are taken as the parameters, when their number and the shapes the state shows agree."""
    candidates = [key for key, value in model.items() if value.is_floating_point() or value.is_complex()]
    if len(candidates) != len(order):
        raise ValueError(
            f"the optimizer has {len(order)} parameters and no names; the model state has {len(candidates)} "
            "floating-point tensors, so they cannot be matched in order: give a state dict with param_names, or a "
            "model state of exactly the optimizer's parameters"
        )
    names = {}
    for (index, _), key in zip(order, candidates):
        shaped = next((v for k, v in state.get(index, {}).items() if k in PARAM_SHAPED_STATE and isinstance(v, Tensor)),
                      None)
        if shaped is not None and shaped.shape != model[key].shape:
            raise ValueError(f"matching parameters to the model's keys in order: parameter {index}'s state has shape "
                             f"{list(shaped.shape)}, the model's {key!r} {list(model[key].shape)}")
        names[index] = key
    notes.append("parameter names taken from the model state's floating-point tensors, in order")
    return names


def _common_step(state: Mapping[int, Mapping[str, Any]]) -> int | None:
    steps = {float(entry["step"]) for entry in state.values() if isinstance(entry.get("step"), (Tensor, int, float))}
    if len(steps) == 1:
        (value,) = steps
        if value.is_integer() and value >= 0:
            return int(value)
    return None


# -- writing ----------------------------------------------------------------------------------------


def _write(
    out: str, storage_options: dict[str, Any] | None, *, algorithm: str, state: dict[int, dict[str, Any]],
    groups: list[dict[str, Any]], params: list[dict[str, Any]], model: Mapping[str, Tensor] | None,
    step: int | None, source_format: str, notes: list[str], progress: Progress,
) -> ConvertResult:
    target = Storage(out, storage_options)
    if target.exists(MANIFEST):
        raise FileExistsError(f"{target.url_of(MANIFEST)}: a committed checkpoint is there already")
    shared: dict[str, Tensor] = {}
    per_parameter = {str(index): _tensors_out(shared, entry, f"perparam.{index}") for index, entry in state.items()}
    entries = None
    if model is not None:
        entries = {}
        for key, value in model.items():
            shared[f"model.{key}"] = storable(value)
            entries[key] = {"tensor": f"model.{key}", "complex": value.is_complex()}
    progress.start(sum(t.numel() * t.element_size() for t in shared.values()), "convert")
    try:
        save_id = f"{secrets.randbits(47):012x}"
        files = {}
        name = shard_file(0, 1, save_id)
        files[name] = write_tensor_file(target, name, {}, exclusive=True)
        name = shared_file(save_id)
        files[name] = write_tensor_file(target, name, shared, exclusive=True)
        progress.advance(files[name].size)
    finally:
        progress.close()
    manifest = Manifest(
        save_id=save_id, world_size=1, files=files, params=params, step=step,
        optimizer={"algorithm": algorithm, "torch": True, "param_groups": to_plain(groups), "buckets": [],
                   "per_parameter": per_parameter},
        model=None if entries is None else {"entries": entries},
        extra={"converted_from": source_format},
    )
    target.write_bytes(MANIFEST, manifest.to_bytes(), exclusive=True)
    return ConvertResult(target.url, manifest, algorithm, source_format, notes)


def _tensors_out(shared: dict[str, Tensor], value: Any, key: str) -> Any:
    """``value`` as JSON data, each tensor moved to ``shared`` (as ``save`` records torch-format state)."""
    if isinstance(value, Tensor):
        if value.layout != torch.strided:
            raise ValueError(f"{key}: a {value.layout} tensor; only dense state can be converted")
        shared[key] = storable(value)  # the file gets its own bytes, never a storage it views
        return {TENSOR: key, "complex": value.is_complex()}
    if isinstance(value, Mapping):
        return {str(k): _tensors_out(shared, v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors_out(shared, v, f"{key}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{key}: a {type(value).__name__} is not state that a checkpoint can hold")

