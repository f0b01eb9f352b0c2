"""Real training clients (Lightning, HF Trainer, accelerate) driving torch.optim and shardoptim.

Each test runs the same training twice on the same seeds, with torch.optim and
torch.optim.lr_scheduler (the oracle) and with shardoptim and shardoptim.sched (the candidate),
and compares what the client produced (arms.py). The clients come from the ``clients`` extra,
which scripts/setup.sh installs.
"""

import pytest
import torch

from . import arms
from .environment import reset_accelerate_state


@pytest.fixture
def candidate() -> arms.Arm:
    return arms.candidate()


@pytest.fixture(autouse=True)
def _restore_process_state():
    """The clients switch process-wide settings (deterministic algorithms, RNG, threads,
    accelerate's singletons); undo them, so that no test sees what the one before left."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    reset_accelerate_state()
    yield
    reset_accelerate_state()
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)
