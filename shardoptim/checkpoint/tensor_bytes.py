"""A tensor's bytes as Python buffers, in bounded pieces, without copying what need not be copied.

:func:`byte_view` is a zero-copy ``memoryview`` of a contiguous CPU tensor's memory (for
``os.write``, CRC32, ``readinto``), which keeps the tensor alive as long as it exists.
:func:`tensor_pieces` yields a tensor's bytes in row-major order in pieces of at most about
``piece_bytes``: straight views of a contiguous CPU tensor, and otherwise small contiguous CPU copies
(non-contiguous layouts, conjugate/negative views, tensors on an accelerator), so the extra memory is
one piece, never the whole tensor.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import torch


def _is_plain_cpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, sharing its memory (and keeping the tensor alive)."""
    if not _is_plain_cpu(tensor):
        raise ValueError("byte_view needs a contiguous CPU tensor without a conjugate or negative bit")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    array.owner = tensor  # the view holds the array, the array the tensor: its memory outlives the view
    return memoryview(array).cast("B")


def _materialize(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.resolve_conj().resolve_neg().contiguous().to("cpu")


def _copied_pieces(tensor: torch.Tensor, piece_bytes: int) -> Iterator[torch.Tensor]:
    itemsize = tensor.element_size()
    if tensor.dim() == 0 or tensor.numel() * itemsize <= piece_bytes:
        yield _materialize(tensor)
    elif tensor.is_contiguous():
        flat = tensor.view(-1)
        step = max(1, piece_bytes // itemsize)
        for start in range(0, flat.numel(), step):
            yield _materialize(flat[start : start + step])
    else:
        row_bytes = tensor[0].numel() * itemsize
        rows = piece_bytes // row_bytes if row_bytes else tensor.shape[0]
        if rows >= 1:
            for start in range(0, tensor.shape[0], rows):
                yield _materialize(tensor[start : start + rows])
        else:  # one row is bigger than a piece: go one dimension down
            for index in range(tensor.shape[0]):
                yield from _copied_pieces(tensor[index], piece_bytes)


def tensor_pieces(tensor: torch.Tensor, piece_bytes: int) -> Iterator[memoryview]:
    """The tensor's bytes in row-major (C) order, as views of at most ~``piece_bytes`` each.

    A view is valid until the next one is requested (it may point into a temporary copy).
    """
    if piece_bytes <= 0:
        raise ValueError(f"piece_bytes must be > 0, got {piece_bytes}")
    tensor = tensor.detach()
    if tensor.numel() == 0:
        return
    if _is_plain_cpu(tensor):
        view = byte_view(tensor)
        for start in range(0, len(view), piece_bytes):
            yield view[start : start + piece_bytes]
        return
    for piece in _copied_pieces(tensor, piece_bytes):
        yield byte_view(piece)
