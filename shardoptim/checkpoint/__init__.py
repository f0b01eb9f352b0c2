"""Checkpoints: sharded safetensors files and a JSON manifest on any fsspec storage.

``save(url, ...)`` writes, per rank, that rank's shards of the optimizer (nothing is gathered);
``load(url, ...)`` restores them at any world size, each rank reading only the ranges it needs;
``latest(root)`` and ``CheckpointManager`` keep a series of them. The format is in
``docs/checkpoint-format.md``; ``shardoptim inspect|verify|consolidate|reshard|convert|diff`` works
on checkpoints from the command line.
"""

from .errors import CheckpointError, CheckpointFormatError, CheckpointIntegrityError
from .manager import CheckpointManager, latest
from .reader import Checkpoint, IncompleteCheckpointError, open_checkpoint
from .restore import load
from .writer import save, wait

__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointFormatError", "CheckpointIntegrityError", "CheckpointManager",
    "IncompleteCheckpointError", "latest", "load", "open_checkpoint", "save", "wait",
]
