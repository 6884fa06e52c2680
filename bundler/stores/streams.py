"""The readable stream every store's ``open_read`` returns, so progress and closing live in one place.

Backends only say how to get the next piece of bytes (``_next_chunk``) and how to let go of their
resources (``_release``); this base turns that into a buffered, non-seekable binary stream that
reports every byte handed to the caller to the :class:`~bundler.progress.Progress` subscriber.
Reporting at delivery (not at arrival) means a parallel download's progress never runs ahead of
what the caller has actually received. The operation's deadline (:mod:`bundler.deadline`), taken
when the stream opens, is checked before every chunk, so no caller reads past it.
"""

from __future__ import annotations

import io
from typing import BinaryIO, cast

from bundler import deadline
from bundler.progress import Progress

#: Buffer between the caller's small reads and the backend's chunks.
READ_BUFFER = 256 << 10


class ChunkReader(io.RawIOBase):
    """A raw stream over ``_next_chunk()``; wrap it with :meth:`buffered` to get a ``BinaryIO``."""

    def __init__(self, progress: Progress, total: int | None) -> None:
        super().__init__()
        self._progress = progress
        self._pending = memoryview(b"")
        self._eof = False
        self.deadline = deadline.current()
        progress.start(total=total)

    def _next_chunk(self) -> bytes:
        """The next bytes of the object, ``b""`` at the end. Called only from the reading thread."""
        raise NotImplementedError

    def _release(self) -> None:
        """Close connections, files and threads; called once, on close."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._eof:
            self.deadline.check("reading from the store")
            chunk = self._next_chunk()
            if chunk:
                self._pending = memoryview(chunk)
            else:
                self._eof = True
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        if n:
            self._progress.update(n)
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._release()
        finally:
            self._pending = memoryview(b"")
            self._progress.close()
            super().close()

    def buffered(self) -> BinaryIO:
        """This raw stream behind a buffer, which is what callers get from ``Store.open_read``."""
        return cast(BinaryIO, io.BufferedReader(self, buffer_size=READ_BUFFER))


def read_up_to(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes of ``stream``, fewer only at its end: a raw stream may return fewer per
    read than asked, so one ``read`` is not enough to know an object's bytes ran out."""
    pieces = []
    while size > 0 and (piece := stream.read(size)):
        pieces.append(piece)
        size -= len(piece)
    return b"".join(pieces)
