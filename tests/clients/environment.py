"""The process the clients run in: offline, with the ``clients`` extra, and one Accelerator at a time."""

from __future__ import annotations

import os
import sys
from types import ModuleType

import pytest

# The clients must never reach the Hugging Face Hub: every model here is built from a config and
# every data set is generated. Set before transformers or accelerate is imported (they read these
# once, at import): conftest.py and every test module import this module first.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require_client(name: str) -> ModuleType:
    """Import a client of the ``clients`` extra; in CI, which installs it, a missing one fails."""
    if os.environ.get("CI"):
        return __import__(name)
    return pytest.importorskip(name, reason=f"{name} comes with the 'clients' extra: pip install -e '.[clients]'")


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, as a new process would (HF's Trainer uses it too)."""
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
