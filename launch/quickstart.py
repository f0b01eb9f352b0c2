"""Single-process quick start: fit a small MLP with shardoptim.AdamW and print the loss falling.

    python launch/quickstart.py [--steps 300] [--optimizer AdamW] [--lr 3e-3]
"""

from __future__ import annotations

import argparse
import time

import torch

import shardoptim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizer", default="AdamW", choices=["SGD", "Adam", "AdamW"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    # A teacher network generates the data; the student learns to imitate it.
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    student = torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)
    )
    inputs = torch.randn(4096, 32)
    with torch.no_grad():
        targets = teacher(inputs)

    kwargs = {"momentum": 0.9} if args.optimizer == "SGD" else {}
    optimizer = getattr(shardoptim, args.optimizer)(student.parameters(), lr=args.lr, **kwargs)
    print(optimizer)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, inputs.shape[0], (256,))
        loss = torch.nn.functional.mse_loss(student(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.5f}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
