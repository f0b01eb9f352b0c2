"""Start, await and SIGKILL the writer subprocess of the crash tests (``kill_writer.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

from tests.checkpoint.moto_server import REPO_ROOT


def start_writer(args: dict) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint.kill_writer", json.dumps(args)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_line(process: subprocess.Popen[str], expected: str, timeout: float = 120.0) -> None:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or line[0].strip() != expected:
        process.kill()
        raise AssertionError(f"writer did not print {expected!r}: {line} {process.communicate()[1][-2000:]}")


def kill(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
