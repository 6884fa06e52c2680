"""One wall-clock deadline per operation, seen by every read of the store the operation makes.

Why: socket timeouts bound each *read*, not an operation. A store that answers and then trickles a
byte a second never trips a 10 s read timeout, and botocore's retries multiply whatever a dead
endpoint costs. The deadline is what a user sets (``BUNDLER_PULL_BUDGET`` for a job,
``--timeout`` for a command); stream readers check it between reads (they read what has arrived,
never waiting to fill a large buffer), so a trickle stops within about a second of it.

The deadline travels in a context variable, so the code between the operation and the socket needs
no extra argument; readers that hand work to their own threads capture it when they are created.
``cancel()`` ends it early: a job that stopped waiting for its bundle stops the download too,
instead of leaving a thread that keeps reading and holds the node's pull lock.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import time
from collections.abc import Iterator

from bundler.errors import DeadlineExceededError


class Deadline:
    """A point in ``time.monotonic()`` after which an operation stops, or a manual cancel."""

    def __init__(self, seconds: float | None, what: str) -> None:
        self.seconds = seconds
        self.what = what  # "the pull budget (BUNDLER_PULL_BUDGET=5)", for the message
        self._at = math.inf if seconds is None else time.monotonic() + seconds
        self._cancelled = threading.Event()

    def remaining(self) -> float:
        """Seconds left (0 when passed or cancelled; ``inf`` when unlimited)."""
        if self._cancelled.is_set():
            return 0.0
        return max(0.0, self._at - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self, doing: str) -> None:
        """Raise :class:`DeadlineExceededError` naming ``doing`` once the deadline has passed."""
        if self.expired():
            reason = "was cancelled" if self._cancelled.is_set() else f"ran out ({self.seconds:g} s)"
            raise DeadlineExceededError(f"{doing}: {self.what} {reason}; stopped waiting for the store")


_UNLIMITED = Deadline(None, "no deadline")
_current: contextvars.ContextVar[Deadline] = contextvars.ContextVar("bundler_deadline", default=_UNLIMITED)


def current() -> Deadline:
    """The deadline of the operation running in this context (unlimited when none was set)."""
    return _current.get()


@contextlib.contextmanager
def scope(deadline: Deadline) -> Iterator[Deadline]:
    """Make ``deadline`` the current one while the block runs (nested scopes keep the sooner)."""
    outer = _current.get()
    chosen = deadline if deadline.remaining() <= outer.remaining() else outer
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)
