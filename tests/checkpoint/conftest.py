"""Fixtures for the checkpoint storage tests: a real S3 endpoint (moto's server) and one root per backend.

``s3_endpoint`` starts ``moto_server.py`` in a subprocess once per session and yields the
``storage_options`` that s3fs needs to reach it; every test gets its own prefix in one bucket. The
start-up time is shown at the end of the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardoptim.checkpoint.storage import Storage

REPO_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "shardoptim-tests"
STARTUP_TIMEOUT_S = 60.0
_startup_seconds: list[float] = []


def _read_port(process: subprocess.Popen[str]) -> int:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(STARTUP_TIMEOUT_S)
    if not line or not line[0].strip().isdigit():
        process.kill()
        stderr = process.communicate(timeout=10)[1]
        raise RuntimeError(f"moto server did not report a port within {STARTUP_TIMEOUT_S} s: {stderr[-2000:]}")
    return int(line[0])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, Any]]:
    """``storage_options`` for s3fs pointing at a moto S3 server on 127.0.0.1 with bucket ``BUCKET``."""
    import s3fs

    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint.moto_server"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = _read_port(process)
        options = {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "key": "testing",
            "secret": "testing",
            "use_ssl": False,
            "client_kwargs": {"region_name": "us-east-1"},
        }
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.call_s3("create_bucket", Bucket=BUCKET)
        _startup_seconds.append(time.perf_counter() - started)
        yield options
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
