"""Test-wide settings."""

import torch

# The tests step tiny tensors: one intra-op thread avoids OpenMP spin-waits dominating the run
# (measured: 40 s vs 12 s for the SGD/Adam parity table on the 2-core CI machine).
torch.set_num_threads(1)
