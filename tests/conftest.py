"""Test-wide settings."""

import os
import tempfile

# torch.compile's on-disk cache does not key its C++ kernels on the thread count: kernels compiled
# here, single-threaded, would be reused by a later multi-threaded run (a training job, a benchmark)
# and run on one core. The tests keep their own cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "shardoptim-tests-inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests step tiny tensors: one intra-op thread avoids OpenMP spin-waits dominating the run
# (measured: 40 s vs 12 s for the SGD/Adam parity table on the 2-core CI machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def worlds():
    """Real gloo process groups on loopback, one per world size, started on first use (tests.distributed.world)."""
    from tests.distributed.world import Worlds

    pool = Worlds()
    yield pool
    pool.close()
