"""Tensors over a range of a flat buffer that are storages of their own.

A parameter re-pointed to a plain view of its bucket shares one storage with every other parameter
of the bucket. Code that reasons about storages then sees one tensor that covers a fraction of a
large storage: ``safetensors`` refuses to save such a model and accelerate keeps one name per
storage (dropping the rest), ``torch.save`` of one parameter writes the whole bucket, and every
write to the bucket bumps the version counter every view shares. An alias is a tensor whose storage
object covers exactly its own bytes of the buffer (and keeps the buffer alive): the parameter then
looks, to everyone, like a tensor of its own, while kernels still update it through the buffer.

The storage is made by handing the memory to torch through an array interface: NumPy's on the CPU,
``__cuda_array_interface__`` on CUDA. Where neither applies (other devices, or NumPy missing) the
alias is a plain view.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    import numpy
except ImportError:  # pragma: no cover - numpy ships with every torch install we support
    numpy = None


class _CudaBytes:
    """``nbytes`` of a CUDA buffer from ``offset`` bytes, exported through ``__cuda_array_interface__``."""

    def __init__(self, flat: Tensor, offset: int, nbytes: int) -> None:
        self._flat = flat  # keeps the memory alive as long as the alias
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (flat.data_ptr() + offset, False),
            "version": 3,
            "strides": None,
        }


def _separate_storage(flat: Tensor, start: int, numel: int) -> Tensor | None:
    """``flat[start : start + numel]`` with a storage of its own, or None where that cannot be made."""
    size = flat.element_size()
    offset, nbytes = start * size, numel * size
    if flat.device.type == "cpu" and numpy is not None:
        raw = flat.view(torch.uint8).numpy()[offset : offset + nbytes]
        return torch.from_numpy(raw).view(flat.dtype)
    if flat.device.type == "cuda":
        try:
            return torch.as_tensor(_CudaBytes(flat, offset, nbytes), device=flat.device).view(flat.dtype)
        except (RuntimeError, TypeError, ValueError):
            return None
    return None


def alias(flat: Tensor, start: int, shape: tuple[int, ...]) -> Tensor:
    """The elements ``flat[start : start + prod(shape)]`` viewed as ``shape``, as a storage of their own.

    ``flat`` is a contiguous 1-D buffer. Writes through either tensor are seen by the other. The
    alias has its own version counter: writing to ``flat`` does not bump it.
    """
    numel = math.prod(shape)
    if numel == 0:  # nothing to share: an empty tensor of its own
        return torch.empty(shape, dtype=flat.dtype, device=flat.device)
    separate = _separate_storage(flat, start, numel)
    if separate is None or separate.data_ptr() != flat.data_ptr() + start * flat.element_size():
        separate = flat[start : start + numel]  # no aliasing storage here (or the interface copied)
    return separate.view(shape)


def aliases_buffer(tensor: Tensor, flat: Tensor, start: int) -> bool:
    """Whether ``tensor`` is where ``alias(flat, start, ...)`` puts it (same dtype, device and address)."""
    return (
        tensor.dtype == flat.dtype
        and tensor.device == flat.device
        and (tensor.numel() == 0 or tensor.data_ptr() == flat.data_ptr() + start * flat.element_size())
    )


def real_view(tensor: Tensor) -> Tensor:
    """A complex tensor as a flat real one, twice as long (what every algorithm and collective works
    on, as torch.optim treats a complex number as a pair of reals); a real one as it is."""
    return torch.view_as_real(tensor).view(-1) if tensor.is_complex() else tensor
