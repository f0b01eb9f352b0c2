"""``consolidate(url, out)``: a checkpoint as one torch.optim state dict and one model state dict.

Written to the directory ``out`` (any fsspec URL):

- ``optimizer.safetensors``: every tensor of the torch-format optimizer state, under flat keys
  ``state.{index}.{name}`` (``state.{index}.{name}.{i}`` for the items of a list of tensors, as
  LBFGS keeps), whole parameters assembled from every rank's shards;
- ``optimizer.json``: ``param_groups`` as torch's ``state_dict()`` has them, the state with numbers
  in place and each tensor as ``{"$tensor": key}``, the parameter names and the key map
  (``keys``: flat key -> ``[index, name, ...]``);
- ``optimizer.pt`` (with ``pt=True``): the same state dict saved by ``torch.save``, which
  ``torch.load(weights_only=True)`` reads and ``torch.optim.<Algorithm>.load_state_dict`` takes;
- ``model.safetensors``: every key of the saved model's ``state_dict()``, parameters assembled from
  the optimizer's shards (``Checkpoint.read_parameter``), buffers and frozen parameters as saved;
- ``ema.safetensors`` when the checkpoint holds an EMA: the averaged weights under the model's keys.

Every tensor is a fresh copy (``torch.save`` of a view would write the whole flat buffer under it,
DESIGN §7). Complex tensors are stored as pairs of reals (``torch.view_as_real``) and listed as
complex (the JSON's ``keys``, the safetensors metadata ``"complex"``); :func:`read_consolidated` and
:func:`read_model_file` turn them back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .capture import TENSOR, storable
from .consistency import check_consistency
from .errors import CheckpointError, CheckpointFormatError
from .json_codec import decode_json, encode_json
from .progress import SILENT, Progress
from .reader import Checkpoint, open_checkpoint
from .restore import torch_format_state
from .storage import Storage
from .tensorfile_reader import TensorFileReader
from .tensorfile_writer import write_tensor_file
from .torch_optim import with_torch_types

CONSOLIDATED_FORMAT = "shardoptim-consolidated"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
OPTIMIZER_PT = "optimizer.pt"
MODEL_TENSORS = "model.safetensors"
EMA_TENSORS = "ema.safetensors"
_COMPLEX_METADATA = "complex"


def optimizer_state(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's optimizer as torch's ``state_dict()`` of it (None without an optimizer).

    Tensors are fresh copies; hyper-parameters that torch keeps as tuples (``betas``) are tuples again.
    """
    saved = checkpoint.manifest.optimizer
    if saved is None:
        return None
    state = torch_format_state(checkpoint)
    state["param_groups"] = [with_torch_types(saved["algorithm"], group) for group in state["param_groups"]]
    return state


def model_state(checkpoint: Checkpoint) -> dict[str, Tensor] | None:
    """The saved model's ``state_dict()``, every key, as fresh tensors (None without a model)."""
    saved = checkpoint.manifest.model
    if saved is None:
        return None
    values: dict[str, Tensor] = {}
    entries = saved["entries"]
    for key, entry in entries.items():
        if "same_as" in entry:
            continue
        values[key] = _entry_value(checkpoint, entry, "param")
    return {key: values[entry["same_as"]] if "same_as" in entry else values[key] for key, entry in entries.items()}


def ema_state(checkpoint: Checkpoint) -> dict[str, Tensor] | None:
    """The EMA's averaged weights: for a ``ShardedEMA`` under the model's keys of the parameters it
    averages (or ``param.{index}`` without a model), for an ``AveragedModel`` its ``state_dict()``."""
    saved = checkpoint.manifest.ema
    if saved is None:
        return None
    if saved["kind"] == "averaged_model":
        return {key: checkpoint.read_shared(f"ema.{key}") for key in saved["keys"]}
    keys = {}
    for key, entry in ((checkpoint.manifest.model or {}).get("entries") or {}).items():
        if "param" in entry:
            keys.setdefault(entry["param"], key)
    indices = [slot.index for bucket in checkpoint.buckets for slot in bucket.layout.slots]
    return {keys.get(index, f"param.{index}"): checkpoint.read_parameter(index, name="ema") for index in sorted(indices)}


def _entry_value(checkpoint: Checkpoint, entry: Mapping[str, Any], name: str) -> Tensor:
    if "param" in entry:
        return checkpoint.read_parameter(entry["param"], name=name)
    return checkpoint.read_shared(entry["tensor"], complex_=bool(entry.get("complex")))


# -- writing ------------------------------------------------------------------------------------------


@dataclass
class ConsolidateResult:
    """What ``consolidate`` wrote: the files under ``out`` and their sizes."""

    out: str
    files: dict[str, int] = field(default_factory=dict)


def consolidate(
    url: str,
    out: str,
    *,
    pt: bool = False,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: Progress = SILENT,
) -> ConsolidateResult:
    """Write the checkpoint at ``url`` to the directory ``out`` as torch-format files (module docstring).

    Every byte read is checked against its CRC. ``FileExistsError`` before anything is written when
    one of the files is already in ``out``, unless ``overwrite``.
    """
    checkpoint = open_checkpoint(url, storage_options)
    check_consistency(checkpoint)
    target = Storage(out, storage_options)
    names = []
    if checkpoint.manifest.optimizer is not None:
        names += [OPTIMIZER_TENSORS, OPTIMIZER_JSON] + ([OPTIMIZER_PT] if pt else [])
    if checkpoint.manifest.model is not None:
        names.append(MODEL_TENSORS)
    if checkpoint.manifest.ema is not None:
        names.append(EMA_TENSORS)
    if not names:
        raise CheckpointError(f"{checkpoint.url}: the checkpoint holds neither an optimizer nor a model")
    if not overwrite:
        existing = [name for name in names if target.exists(name)]
        if existing:
            raise FileExistsError(f"{target.url_of(existing[0])} exists; pass overwrite=True (--overwrite) to replace it")
    result = ConsolidateResult(target.url)
    progress.start(sum(record.size for record in checkpoint.manifest.files.values()), "consolidate")
    try:
        state = optimizer_state(checkpoint)
        if state is not None:
            tensors, document = _flatten_optimizer(checkpoint, state)
            progress.advance(sum(t.nbytes for t in tensors.values()))
            _write(target, result, OPTIMIZER_TENSORS, tensors, overwrite=overwrite)
            _write_bytes(target, result, OPTIMIZER_JSON, encode_json(document, indent=1), overwrite=overwrite)
            if pt:
                with target.open_write(OPTIMIZER_PT, exclusive=not overwrite) as f:
                    torch.save(state, f)
                result.files[OPTIMIZER_PT] = target.size(OPTIMIZER_PT)
        for name, values in ((MODEL_TENSORS, model_state(checkpoint)), (EMA_TENSORS, ema_state(checkpoint))):
            if values is not None:
                progress.advance(sum(t.nbytes for t in values.values()))
                _write_state_file(target, result, name, values, overwrite=overwrite)
    finally:
        progress.close()
    return result


def _flatten_optimizer(checkpoint: Checkpoint, state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    keys: dict[str, dict[str, Any]] = {}

    def out(value: Any, path: list[Any]) -> Any:
        if isinstance(value, Tensor):
            key = ".".join(str(part) for part in ["state", *path])
            tensors[key] = storable(value)  # already a copy (torch_format_state's)
            keys[key] = {"path": path, "complex": value.is_complex()}
            return {TENSOR: key}
        if isinstance(value, Mapping):
            return {str(k): out(v, [*path, k]) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [out(v, [*path, i]) for i, v in enumerate(value)]
        return value

    document_state = {str(index): out(entry, [index]) for index, entry in state["state"].items()}
    manifest = checkpoint.manifest
    return tensors, {
        "format": CONSOLIDATED_FORMAT,
        "version": 1,
        "source": checkpoint.url,
        "save_id": manifest.save_id,
        "step": manifest.step,
        "algorithm": manifest.optimizer["algorithm"],
        "param_groups": state["param_groups"],
        "param_names": {str(p["index"]): p.get("name") for p in manifest.params},
        "state": document_state,
        "keys": keys,
    }


def _write(target: Storage, result: ConsolidateResult, name: str, tensors: dict[str, Tensor], *,
           overwrite: bool, metadata: dict[str, str] | None = None) -> None:
    record = write_tensor_file(target, name, tensors, metadata=metadata, exclusive=not overwrite)
    result.files[name] = record.size


def _write_bytes(target: Storage, result: ConsolidateResult, name: str, data: Any, *, overwrite: bool) -> None:
    target.write_bytes(name, data, exclusive=not overwrite)
    result.files[name] = len(data)


def _write_state_file(target: Storage, result: ConsolidateResult, name: str, values: dict[str, Tensor], *,
                      overwrite: bool) -> None:
    complex_keys = [key for key, value in values.items() if value.is_complex()]
    tensors = {key: storable(value) for key, value in values.items()}
    metadata = {_COMPLEX_METADATA: json.dumps(complex_keys)} if complex_keys else None
    _write(target, result, name, tensors, overwrite=overwrite, metadata=metadata)


# -- reading back -----------------------------------------------------------------------------------


def read_consolidated(out: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The torch-format optimizer state dict that ``consolidate`` wrote to ``out``, without pickle."""
    storage = Storage(out, storage_options)
    document = decode_json(storage.read_bytes(OPTIMIZER_JSON), source=storage.url_of(OPTIMIZER_JSON))
    if not isinstance(document, dict) or document.get("format") != CONSOLIDATED_FORMAT:
        raise CheckpointFormatError(f"{storage.url_of(OPTIMIZER_JSON)}: not a consolidated optimizer state")
    reader = TensorFileReader(storage, OPTIMIZER_TENSORS, expected=None)
    keys = document.get("keys", {})

    def back(value: Any) -> Any:
        if isinstance(value, dict) and TENSOR in value:
            tensor = reader.read(value[TENSOR])
            return torch.view_as_complex(tensor) if keys.get(value[TENSOR], {}).get("complex") else tensor
        if isinstance(value, dict):
            return {k: back(v) for k, v in value.items()}
        if isinstance(value, list):
            return [back(v) for v in value]
        return value

    return {
        "state": {int(index): back(entry) for index, entry in document["state"].items()},
        "param_groups": [with_torch_types(document["algorithm"], group) for group in document["param_groups"]],
    }


def read_model_file(out: str, name: str = MODEL_TENSORS, *, storage_options: dict[str, Any] | None = None
                    ) -> dict[str, Tensor]:
    """A state dict that ``consolidate`` wrote (``model.safetensors``, ``ema.safetensors``), complex restored."""
    reader = TensorFileReader(Storage(out, storage_options), name, expected=None)
    complex_keys = set(json.loads(reader.metadata.get(_COMPLEX_METADATA, "[]")))
    return {key: torch.view_as_complex(reader.read(key)) if key in complex_keys else reader.read(key)
            for key in reader.names}
