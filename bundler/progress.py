"""Progress reporting as a subscriber, so transfer code never asks "is anyone watching?".

Transfers call ``progress.update(n)`` unconditionally; whether that draws a bar is decided once,
where the progress object is made (``for_transfer``): a bar on a TTY for transfers big enough to
watch, nothing in CI or in a training process's log.
"""

from __future__ import annotations

import sys
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
    """A tqdm bar on stderr; tqdm is imported only when a bar is actually drawn."""

    def __init__(self, description: str, total: int | None = None) -> None:
        self._description = description
        self._total = total
        self._bar: Any = None

    def start(self, total: int | None = None, **kwargs: Any) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total if total is not None else self._total,
            desc=self._description,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
        )

    def update(self, n: int, **kwargs: Any) -> None:
        if self._bar is None:
            self.start()
        self._bar.update(n)

    def close(self, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def for_transfer(description: str, total: int | None, *, quiet: bool = False) -> Progress:
    """A bar when a person is watching (stderr is a TTY) and the transfer is worth watching."""
    if quiet or not sys.stderr.isatty():
        return NULL_PROGRESS
    if total is not None and total < MIN_BAR_BYTES:
        return NULL_PROGRESS
    return BarProgress(description, total)
