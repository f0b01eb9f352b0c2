"""A training process for the crash tests: saves checkpoint after checkpoint until it is killed.

``python -m tests.checkpoint.crash_saver ROOT STORAGE_OPTIONS_JSON``: prints ``ready`` once it is
about to save for the first time, then ``committed <step>`` after each commit.
"""

from __future__ import annotations

import json
import sys

import torch

import shardoptim
from shardoptim import checkpoint


def main() -> None:
    root, options = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 256))
    opt = shardoptim.AdamW(model.parameters(), lr=1e-3)
    manager = checkpoint.CheckpointManager(root, keep_last=2, storage_options=options)
    print("ready", flush=True)
    for step in range(1_000_000):
        model(torch.randn(8, 256)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        manager.save(step, model=model, optimizer=opt, extra={"step": step})
        print(f"committed {step}", flush=True)


if __name__ == "__main__":
    main()
