"""A writer process for the crash tests: the parent kills it with SIGKILL part-way through.

``python -m tests.checkpoint.kill_writer '<json>'`` with ``url``, ``storage_options``, ``name`` and
``mode``:

- ``"stream"``: writes ``name`` through ``Storage.open_write`` in 1 MiB pieces of the byte ``fill``,
  prints ``writing`` once ``announce_mib`` MiB are written (past one S3 part, so a multipart upload
  is under way), then keeps writing slowly until killed;
- ``"tensorfile"``: prints ``started``, writes :func:`crash_tensors` with ``write_tensor_file``,
  prints ``done``.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from shardoptim.checkpoint.storage import Storage
from shardoptim.checkpoint.tensorfile_writer import write_tensor_file

PIECE = 2**20


def crash_tensors(seed: int) -> dict[str, torch.Tensor]:
    """The tensors of the ``tensorfile`` mode: ~20 MiB, deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(2**20, 4, generator=generator),
        "b": torch.randint(0, 2**15, (2**20,), generator=generator, dtype=torch.int16),
        "c": torch.randn(3, 5, generator=generator, dtype=torch.float64),
    }


def main() -> None:
    args = json.loads(sys.argv[1])
    storage = Storage(args["url"], args["storage_options"])
    if args["mode"] == "stream":
        piece = bytes([args["fill"]]) * PIECE
        with storage.open_write(args["name"], exclusive=args.get("exclusive", False)) as f:
            for written in range(1, 1_000_000):
                f.write(piece)
                if written == args["announce_mib"]:
                    f.flush()
                    print("writing", flush=True)
                if written >= args["announce_mib"]:
                    time.sleep(0.05)
    else:
        print("started", flush=True)
        write_tensor_file(storage, args["name"], crash_tensors(args["seed"]))
        print("done", flush=True)


if __name__ == "__main__":
    main()
