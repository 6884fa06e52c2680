"""Progress reporting as a subscriber, so transfer code never asks "is anyone watching?".

Transfers call ``progress.update(n)`` unconditionally; whether that draws a bar is decided once,
where the progress object is made (``for_transfer``): a bar on a TTY for transfers big enough to
watch, nothing in CI or in a training process's log.
"""

from __future__ import annotations

import shutil
import sys
import threading
from typing import Any


class Progress:
    """Null object: every transfer takes one, the default does nothing."""

    def start(self, total: int | None = None, **kwargs: Any) -> None:
        """Called once before the first update; ``total`` may be unknown (None)."""

    def update(self, n: int, **kwargs: Any) -> None:
        """``n`` more bytes moved. Must be cheap and thread-safe: ranged downloads call it from workers."""

    def close(self, **kwargs: Any) -> None:
        """Called once when the transfer ends, successfully or not."""


NULL_PROGRESS = Progress()

#: Below this many bytes a bar would flash by and only add noise.
MIN_BAR_BYTES = 4 << 20


class BarProgress(Progress):
    """A tqdm bar on stderr; tqdm is imported only when a bar is actually drawn.

    The size is often known only when the store starts the transfer, so the decision to draw
    is taken in ``start``: transfers under ``MIN_BAR_BYTES`` stay silent. Multipart and ranged
    transfers update from worker threads, hence the lock.
    """

    def __init__(self, description: str) -> None:
        self._description = description
        self._bar: Any = None
        self._lock = threading.Lock()

    def start(self, total: int | None = None, **kwargs: Any) -> None:
        with self._lock:
            if self._bar is not None or (total is not None and total < MIN_BAR_BYTES):
                return
            from tqdm import tqdm

            # A terminal that reports a 0x0 size (fresh ptys, some CI runners) makes tqdm draw
            # nothing at all; shutil falls back to 80x24 there.
            size = shutil.get_terminal_size(fallback=(80, 24))
            self._bar = tqdm(
                total=total, desc=self._description, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=False, ncols=size.columns, nrows=size.lines,
            )

    def update(self, n: int, **kwargs: Any) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n)

    def close(self, **kwargs: Any) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


def for_transfer(description: str, *, quiet: bool = False) -> Progress:
    """A bar when a person is watching (stderr is a TTY); silent in CI logs and with --quiet."""
    if quiet or not sys.stderr.isatty():
        return NULL_PROGRESS
    return BarProgress(description)
