"""Reading a torch.distributed.checkpoint (DCP) directory in one process, without unpickling code.

Through torch's own reader API (``FileSystemReader`` and ``dcp.load(..., no_dist=True)`` into
tensors allocated from the metadata), with the two places where DCP would unpickle replaced:

- the ``.metadata`` file is a pickle; it is read by an unpickler that resolves only the classes
  a DCP metadata file consists of (``torch.distributed.checkpoint.metadata``'s dataclasses,
  ``torch.Size``, dtypes, layouts, paths) and refuses any other global, naming it;
- non-tensor values (a param group's ``lr``, ``betas``, ``params``) are ``torch.save``d bytes, read
  with ``torch.load(weights_only=True)`` (DCP's default planner uses ``weights_only=False``).

Tensors themselves DCP reads with ``weights_only=True`` already. Before any tensor is allocated the
sizes the metadata claims are checked against the bytes the directory holds.

DCP keeps one rank's copy of a key when ranks saved different plain tensors under it (DESIGN §7):
what was saved as a plain tensor on several ranks comes back as one rank's; DTensors and
ShardedTensors come back whole.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata

from .errors import CheckpointFormatError

METADATA_FILE = ".metadata"
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


def is_dcp_directory(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointFormatError(
            f"{self.source}: refers to {module}.{name:.80}, which is not part of DCP metadata; refusing to unpickle it"
        )


class _Reader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        source = os.path.join(os.fspath(self.path), METADATA_FILE)
        with open(source, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, source).load()
            except CheckpointFormatError:
                raise
            except Exception as error:  # noqa: BLE001 - any malformed pickle is a malformed file
                raise CheckpointFormatError(f"{source}: not a DCP metadata file: {error}") from None
        if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
            raise CheckpointFormatError(f"{source}: not a DCP metadata file")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(DefaultLoadPlanner):
    """Loads into the flat state dict it is given; non-tensor values without pickle."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item: Any, value: Any) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def read_dcp(path: str) -> dict[str, Any]:
    """The nested state dict saved in the DCP directory ``path`` (``{"model": ..., "optim": ...}``)."""
    path = os.fspath(path)
    if not is_dcp_directory(path):
        raise FileNotFoundError(f"{path}: not a DCP checkpoint directory (no {METADATA_FILE})")
    reader = _Reader(path)
    metadata = reader.read_metadata()
    _check_sizes(path, metadata)
    flat: dict[str, Any] = {}
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            flat[key] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        elif isinstance(entry, BytesStorageMetadata):
            flat[key] = None
        else:
            raise CheckpointFormatError(f"{path}: key {key!r:.100} has metadata of type {type(entry).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, as meant
            dcp.load(flat, storage_reader=reader, planner=_Planner(), no_dist=True)
    except CheckpointFormatError:
        raise
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(f"{path}: a value is not plain data (weights_only refused it): {error}") from None
    except (RuntimeError, ValueError, KeyError, AssertionError) as error:
        raise CheckpointFormatError(f"{path}: DCP could not read it: {error}") from None
    return _unflatten(flat, metadata.planner_data, path)


def _check_sizes(path: str, metadata: Metadata) -> None:
    """Refuse metadata claiming more tensor bytes than the directory's files hold (when uncompressed)."""
    storage = metadata.storage_data or {}
    if any(getattr(info, "transform_descriptors", None) for info in storage.values()):
        return  # compressed: sizes cannot be bounded by the files
    held = sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())
    claimed = 0
    for entry in metadata.state_dict_metadata.values():
        if isinstance(entry, TensorStorageMetadata):
            if len(entry.size) > 64 or any(not isinstance(n, int) or n < 0 for n in entry.size):
                raise CheckpointFormatError(f"{path}: a tensor with an invalid shape {entry.size!r:.100}")
            claimed += math.prod(entry.size) * entry.properties.dtype.itemsize
    if claimed > held:
        raise CheckpointFormatError(f"{path}: the metadata claims {claimed} bytes of tensors; the files hold {held}")


def _unflatten(flat: dict[str, Any], mapping: Any, path: str) -> dict[str, Any]:
    """DCP's flat keys back into the nested dicts and lists they were saved from (int parts are list
    positions, as DCP's own ``set_element`` takes them)."""
    if not isinstance(mapping, dict):
        raise CheckpointFormatError(f"{path}: the metadata has no key mapping (planner_data)")
    root: dict[str, Any] = {}
    for key, value in flat.items():
        parts = mapping.get(key, (key,))
        if not isinstance(parts, tuple) or not parts or not all(isinstance(p, (str, int)) for p in parts):
            raise CheckpointFormatError(f"{path}: key {key!r:.100} has an invalid path {parts!r:.100}")
        container: Any = root
        for part, following in zip(parts, parts[1:]):
            fresh: Any = {} if isinstance(following, str) else []
            container = _child(container, part, fresh, path)
        _put(container, parts[-1], value, path)
    return root


def _child(container: Any, part: str | int, fresh: Any, path: str) -> Any:
    if isinstance(container, dict):
        return container.setdefault(part, fresh)
    if not isinstance(part, int) or part < 0 or part > 1 << 20:
        raise CheckpointFormatError(f"{path}: a list position {part!r} in a key path")
    container.extend([None] * (part + 1 - len(container)))
    if container[part] is None:
        container[part] = fresh
    return container[part]


def _put(container: Any, part: str | int, value: Any, path: str) -> None:
    if isinstance(container, dict):
        container[part] = value
        return
    if not isinstance(part, int) or part < 0 or part > 1 << 20:
        raise CheckpointFormatError(f"{path}: a list position {part!r} in a key path")
    container.extend([None] * (part + 1 - len(container)))
    container[part] = value
