"""Aliases: a range of a flat buffer as a tensor with a storage of its own, on the CPU and CUDA."""

from __future__ import annotations

import pytest
import torch

from shardoptim.core.alias import alias, aliases_buffer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.complex64, torch.float64])
def test_an_alias_shares_memory_but_not_the_storage_or_the_version(device, dtype):
    flat = torch.zeros(64, dtype=dtype, device=device)
    view = alias(flat, 16, (4, 5))
    assert aliases_buffer(view, flat, 16)
    assert view.untyped_storage().nbytes() == 20 * flat.element_size(), "a storage of exactly its own bytes"
    flat[16:36] = 3
    assert torch.equal(view, torch.full((4, 5), 3, dtype=dtype, device=device))
    view.mul_(2)
    assert torch.equal(flat[16:36], torch.full((20,), 6, dtype=dtype, device=device))
    before = view._version
    flat.add_(1)
    assert view._version == before, "writes through the buffer do not bump the alias's version"


@pytest.mark.parametrize("device", DEVICES)
def test_an_alias_keeps_its_buffer_alive(device):
    flat = torch.arange(32, dtype=torch.float32, device=device)
    view = alias(flat, 8, (8,))
    del flat
    assert torch.equal(view.cpu(), torch.arange(8, 16, dtype=torch.float32))


def test_an_empty_alias_is_a_tensor_of_its_own():
    flat = torch.zeros(16)
    empty = alias(flat, 16, (0, 3))
    assert empty.shape == (0, 3) and empty.untyped_storage().nbytes() == 0
