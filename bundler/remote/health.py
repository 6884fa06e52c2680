"""The process-wide handle on ``settings.remote`` and the circuit breakers in front of it.

Every per-kernel lookup (``bundler.autotune``, ``integrations.triton_remote``) and every compile
session (``bundler.session``) talks to the same remote, so they share one opened store (an S3 client
costs tens of ms to build; a session given its own store uses that one) and one view of its health:

* a breaker *trips* on the first store error of its kind (a session's failed bundle fetch or push
  included; a corrupt or hostile bundle is not the store's fault and trips nothing): one warning,
  then that kind of request is skipped, per-kernel records and session fetches or pushes alike, so
  a dead endpoint costs one timeout per process instead of one per kernel;
* reads and writes trip separately, because training nodes often hold read-only credentials: an
  ``AccessDenied`` on a save must not stop the reads that are the whole point on such a node;
* a tripped read breaker closes again after :data:`READ_RETRY_S`, since an endpoint that was down
  at job start (a network blip, a restarting gateway) is often back minutes later; a write error
  is usually a permission and stays tripped for the rest of the process.

Forked children (DataLoader workers) open their own store, since they must not share the parent's
HTTP connection pool, and get new locks, since a parent thread may have held one at the fork; they
keep what the parent learned about the remote's health.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any

from bundler.config import Settings

log = logging.getLogger(__name__)

#: Seconds after which a tripped read breaker lets requests through again.
READ_RETRY_S = 300.0

_clock = time.monotonic  # a module attribute so tests can move time forward


def shared_store(settings: Settings) -> Any:
    """The store of ``settings.remote``, opened once per process and shared by every user."""
    return _opened(settings)


@functools.lru_cache(maxsize=8)
def _opened(settings: Settings) -> Any:
    from bundler.stores import open_store

    return open_store(settings.remote, settings)


class Breaker:
    """Per-remote circuit breaker for one kind of request (``"read"`` or ``"write"``)."""

    def __init__(self, action: str, retry_after: float | None) -> None:
        self.action = action
        self.retry_after = retry_after  # None: once tripped, tripped for the process
        self._tripped: dict[str, float] = {}  # remote URL -> when it tripped
        self._lock = threading.Lock()

    def closed(self, remote: str) -> bool:
        """True when requests of this kind may go to ``remote``."""
        with self._lock:
            since = self._tripped.get(remote)
            if since is None:
                return True
            if self.retry_after is not None and _clock() - since >= self.retry_after:
                del self._tripped[remote]
                log.info("retrying %ss from %s: %.0f s passed since they failed", self.action, remote,
                         self.retry_after)
                return True
            return False

    def trip(self, remote: str, key: str, exc: BaseException) -> None:
        """Note a failure; the first one per trip is logged as a warning."""
        with self._lock:
            first = remote not in self._tripped
            self._tripped[remote] = _clock()
        if first:
            later = (f"retried after {self.retry_after:.0f} s" if self.retry_after is not None
                     else "off for the rest of this process")
            log.warning("could not %s %s in %s (%s: %s); remote %ss (bundles and per-kernel records) are %s, "
                        "and kernels are tuned and compiled as if the remote were empty",
                        self.action, key, remote, type(exc).__name__, exc, self.action, later)

    def forget(self) -> None:
        """Close again for every remote (tests)."""
        with self._lock:
            self._tripped.clear()

    def after_fork(self) -> None:
        """In a forked child: a new lock, since the thread that held the old one is gone there."""
        self._lock = threading.Lock()


_breakers = {"read": Breaker("read", READ_RETRY_S), "write": Breaker("write", None)}


def remote_usable(settings: Settings, action: str) -> bool:
    """Whether ``action`` (``"read"`` / ``"write"``) requests may go to ``settings.remote`` now."""
    return bool(settings.remote) and _breakers[action].closed(str(settings.remote))


def remote_failed(settings: Settings, action: str, key: str, exc: BaseException) -> None:
    """Report a failed ``action`` on ``key``: trips that action's breaker for ``settings.remote``."""
    _breakers[action].trip(str(settings.remote), key, exc)


def reset() -> None:
    """Forget opened stores and tripped breakers (tests, or after changing credentials)."""
    _opened.cache_clear()
    for breaker in _breakers.values():
        breaker.forget()


def _after_fork_in_child() -> None:
    # The child keeps what the parent learned about the remote's health, but not its connections.
    _opened.cache_clear()
    for breaker in _breakers.values():
        breaker.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
