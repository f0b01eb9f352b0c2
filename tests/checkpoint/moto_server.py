"""A moto S3 server on 127.0.0.1, on a port the OS picks; prints the port, then serves until killed.

``s3_server()`` runs it as ``python -m tests.checkpoint.moto_server`` (for the ``s3_endpoint`` fixture
and bench/reliability.py). Binding port 0 and reporting the port (rather than probing for a free one
first) leaves no window for a race.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


REPO_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "shardoptim-tests"
STARTUP_TIMEOUT_S = 60.0


def _read_port(process: subprocess.Popen[str], log: Any) -> int:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(STARTUP_TIMEOUT_S)
    if not line or not line[0].strip().isdigit():
        process.kill()
        process.wait(timeout=10)
        log.seek(0)
        raise RuntimeError(f"moto server did not report a port within {STARTUP_TIMEOUT_S} s: {log.read()[-2000:]}")
    return int(line[0])


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, Any]]:
    """A moto S3 server in a subprocess with bucket ``BUCKET``: yields s3fs's ``storage_options``."""
    import s3fs

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # The server logs every request to stderr: into a file, since a pipe nobody drains fills up and
    # blocks the server mid-request after a few thousand requests.
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint.moto_server"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    try:
        port = _read_port(process, log)
        options = {
            "endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing", "use_ssl": False,
            "client_kwargs": {"region_name": "us-east-1"},
        }
        s3fs.S3FileSystem(**options, skip_instance_cache=True).call_s3("create_bucket", Bucket=BUCKET)
        yield options
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def main() -> None:
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
