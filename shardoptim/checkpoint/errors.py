"""The exceptions the checkpoint layer raises for damaged, hostile or mismatched files.

Both are ``ValueError`` subclasses, so code that already treats bad input as ``ValueError`` keeps
working; catching :class:`CheckpointError` catches every refusal of a file's contents. I/O failures
stay the ``OSError`` family (``FileNotFoundError``, ``FileExistsError``) and short reads ``EOFError``.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file was refused. The message names the file (its URL) and what was wrong."""


class CheckpointFormatError(CheckpointError):
    """A file's structure is invalid: a malformed or out-of-bounds header, manifest JSON over a limit."""


class CheckpointIntegrityError(CheckpointError):
    """A file's bytes do not match the digest or CRC recorded for them: corruption or truncation."""
