"""Fixtures for the checkpoint storage tests: a real S3 endpoint (moto's server) and one root per backend.

``s3_endpoint`` starts ``moto_server.py`` in a subprocess once per session and yields the
``storage_options`` that s3fs needs to reach it; every test gets its own prefix in one bucket. The
start-up time is shown at the end of the run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardoptim.checkpoint.storage import Storage

from .moto_server import BUCKET, s3_server

_startup_seconds: list[float] = []


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, Any]]:
    """``storage_options`` for s3fs pointing at a moto S3 server on 127.0.0.1 with bucket ``BUCKET``."""
    started = time.perf_counter()
    with s3_server() as options:
        _startup_seconds.append(time.perf_counter() - started)
        yield options


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _startup_seconds:
        terminalreporter.write_line(f"moto S3 endpoint: started and bucket created in {_startup_seconds[0]:.2f} s")


def _unique() -> str:
    return uuid.uuid4().hex[:12]


BACKENDS = ["local", "memory", "s3"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def storage_root(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    """(url, storage_options) of an empty directory on the test's backend."""
    if backend == "local":
        yield str(tmp_path / "ckpt"), {}
    elif backend == "memory":
        import fsspec

        url = f"memory://shardoptim-tests/{_unique()}"
        yield url, {}
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)
    else:
        options = request.getfixturevalue("s3_endpoint")
        yield f"s3://{BUCKET}/{_unique()}", options


class CountingStorage(Storage):
    """The real storage (use it on local disk: elsewhere read_into counts through read_bytes too), counting bytes read."""

    bytes_read = 0

    def read_bytes(self, name, start=None, end=None):
        data = super().read_bytes(name, start, end)
        self.bytes_read += len(data)
        return data

    def read_into(self, name, offset, buffer):
        super().read_into(name, offset, buffer)
        self.bytes_read += len(buffer)
