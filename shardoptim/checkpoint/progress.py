"""How the checkpoint tools report progress: a counter of bytes that the caller may draw as a bar.

The tools (``verify``, ``consolidate``, ``reshard``, ``convert``) take ``progress=`` and call
``progress.start(total, what)``, ``progress.advance(nbytes)`` as they read or write, and
``progress.close()`` at the end; :data:`SILENT` does nothing. The command line passes a tqdm bar
(``shardoptim.checkpoint.cli``); library code never prints.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """A counter of work done, in bytes."""

    def start(self, total: int, what: str) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


class _Silent:
    def start(self, total: int, what: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


#: The progress of a caller that does not want any.
SILENT: Progress = _Silent()
