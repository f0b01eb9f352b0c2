"""A pool of real gloo process groups for tests: N worker processes on loopback, reused across tests.

Starting a rank costs seconds here (importing torch), so each world size is started once per session
and every test sends it a function to run on all ranks. A failure or a timeout tears the world down
(its ranks may be stuck in a collective) and the next test starts a fresh one.
"""

from __future__ import annotations

import datetime
import importlib
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: How long a collective may block before gloo raises, inside the workers.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, size: int, port: int, tasks: list, results: Any) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        while (task := tasks[rank].get()) is not None:
            module, name, args = task
            try:
                value = getattr(importlib.import_module(module), name)(*args)
                results.put((rank, True, value))
            except BaseException:  # noqa: BLE001 - reported to the test, which fails
                results.put((rank, False, traceback.format_exc()))
        dist.barrier()  # leave together: a rank tearing gloo down early can abort a peer's exit
    finally:
        dist.destroy_process_group()


class World:
    """``size`` ranks in one gloo process group; ``run(fn, *args)`` calls ``fn(*args)`` on every rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        context = mp.get_context("spawn")
        self._tasks = [context.Queue() for _ in range(size)]
        self._results = context.Queue()
        port = free_port()
        self._processes = [
            context.Process(target=_serve, args=(rank, size, port, self._tasks, self._results), daemon=True)
            for rank in range(size)
        ]
        for process in self._processes:
            process.start()

    @property
    def alive(self) -> bool:
        return all(process.is_alive() for process in self._processes)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
        """``fn(*args)`` on every rank (``fn`` importable at module level); the per-rank return values."""
        for rank_tasks in self._tasks:
            rank_tasks.put((fn.__module__, fn.__qualname__, args))
        values: list[Any] = [None] * self.size
        failures = []
        for _ in range(self.size):
            try:
                # Once a rank failed, the others may be blocked in a collective: don't wait for gloo's timeout.
                rank, ok, value = self._results.get(timeout=5.0 if failures else timeout)
            except queue.Empty:
                self.close()
                if failures:
                    break
                raise TimeoutError(f"{fn.__qualname__} did not finish on all {self.size} ranks in {timeout} s")
            if ok:
                values[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            self.close()
            raise AssertionError("\n".join(failures))
        return values

    def close(self) -> None:
        for rank_tasks in self._tasks:
            rank_tasks.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


class Worlds:
    """One ``World`` per size, started on first use and replaced when a test broke it."""

    def __init__(self) -> None:
        self._worlds: dict[int, World] = {}

    def get(self, size: int) -> World:
        world = self._worlds.get(size)
        if world is None or not world.alive:
            world = self._worlds[size] = World(size)
        return world

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
