"""The failure policy, in one place: how a job talks to ``settings.remote`` without depending on it.

DESIGN.md: the cache is an accelerator, never a dependency. Every place a job touches the store
(a compile session's fetch and push, a per-kernel record lookup or save, Triton's remote cache
backend, the torch.compile integration) goes through :func:`guarded`, which applies these rules:

1. **One wait budget.** A job waits on the store at most ``BUNDLER_PULL_BUDGET`` seconds in total,
   per remote and process, measured on wall time across requests, retries and slow bodies. Each
   request runs in a worker thread and the caller waits only for what is left of the budget; the
   request's own deadline (:mod:`bundler.deadline`) is cancelled when the caller stops waiting, so
   a trickling body does not keep a thread reading.
2. **One failure stops the store for the process.** An unreachable store, a server error after
   botocore's retries or a spent budget marks the remote *down*: reads and writes, bundles and
   records, all skip it. One warning line says so; the detail goes to DEBUG. Reads are tried again
   after :data:`READ_RETRY_S` if budget is left (an endpoint down at job start is often back).
3. **A denied action stops only that action.** Training nodes often hold read-only credentials:
   an ``AccessDenied`` on a save must not stop the reads that are the point on such a node.
4. **A bad object is the object's fault.** A corrupt, hostile or oversized object is a miss with a
   warning naming its key; it says nothing about the store's health and trips nothing.
5. **A miss is a miss.** ``NotFoundError`` passes through as ``None``.

Also here: one opened store per remote and process (an S3 client costs tens of ms to build).
Forked children (DataLoader workers) open their own store and get new locks; they keep what the
parent learned about the remote's health.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bundler import deadline
from bundler.config import Settings
from bundler.errors import AccessDeniedError, BundleError, DeadlineExceededError, NotFoundError, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds after which a remote marked down for reads is tried again (while budget is left).
READ_RETRY_S = 300.0

_clock = time.monotonic  # a module attribute so tests can move time forward


def shared_store(settings: Settings) -> Any:
    """The store of ``settings.remote``, opened once per process and shared by every user."""
    return _opened(settings)


@functools.lru_cache(maxsize=8)
def _opened(settings: Settings) -> Any:
    from bundler.stores import open_store

    return open_store(settings.remote, settings)


class _RemoteState:
    """What this process knows about one remote: when each action went down, budget spent."""

    def __init__(self) -> None:
        self.down_since: dict[str, float] = {}  # action -> when it went down
        self.waited = 0.0
        self.warned = False


class Health:
    """Per-process health of every remote: the breakers and the wait budget (rules 1-3)."""

    def __init__(self) -> None:
        self._remotes: dict[str, _RemoteState] = {}
        self._lock = threading.Lock()

    def _state(self, remote: str) -> _RemoteState:
        state = self._remotes.get(remote)
        if state is None:
            state = self._remotes[remote] = _RemoteState()
        return state

    def usable(self, settings: Settings, action: str) -> bool:
        remote = str(settings.remote)
        with self._lock:
            state = self._state(remote)
            since = state.down_since.get(action)
            if since is None:
                return True
            if action == "read" and _clock() - since >= READ_RETRY_S and state.waited < settings.pull_budget:
                del state.down_since[action]
                log.info("trying reads from %s again: %.0f s passed since they failed", remote, READ_RETRY_S)
                return True
            return False

    def budget_left(self, settings: Settings) -> float:
        with self._lock:
            return max(0.0, settings.pull_budget - self._state(str(settings.remote)).waited)

    def spend(self, settings: Settings, seconds: float) -> None:
        with self._lock:
            self._state(str(settings.remote)).waited += seconds

    def failed(self, settings: Settings, action: str, key: str, exc: BaseException) -> None:
        """Mark the remote down (rule 2), or only ``action`` when it was denied (rule 3)."""
        remote = str(settings.remote)
        actions = (action,) if isinstance(exc, AccessDeniedError) else ("read", "write")
        with self._lock:
            state = self._state(remote)
            now = _clock()
            for each in actions:
                state.down_since.setdefault(each, now)
            first, state.warned = not state.warned, True
        what = f"{action}s" if len(actions) == 1 else "reads and writes"
        log.debug("%s of %s in %s failed", action, key, remote, exc_info=exc)
        message = f"remote {_short_url(remote)}: {action} of {_short(key)} failed ({_reason(exc)}); {what} skipped"
        if first:
            log.warning("%s", message)
        else:
            log.info("%s", message)

    def forget(self) -> None:
        with self._lock:
            self._remotes.clear()

    def after_fork(self) -> None:
        self._lock = threading.Lock()


_health = Health()


def remote_usable(settings: Settings, action: str) -> bool:
    """Whether ``action`` (``"read"`` / ``"write"``) requests may go to ``settings.remote`` now."""
    return bool(settings.remote) and _health.usable(settings, action) and _health.budget_left(settings) > 0


def remote_failed(settings: Settings, action: str, key: str, exc: BaseException) -> None:
    """Report a failed ``action`` on ``key`` (rules 2 and 3); the first report warns."""
    _health.failed(settings, action, key, exc)


def budget_left(settings: Settings) -> float:
    """Seconds this process may still wait on ``settings.remote`` (rule 1)."""
    return _health.budget_left(settings)


def spend(settings: Settings, seconds: float) -> None:
    """Count ``seconds`` the job waited on ``settings.remote`` against its budget."""
    _health.spend(settings, seconds)


class _Skipped(Exception):
    pass


def guarded(settings: Settings, action: str, key: str, request: Callable[[], T], *, wait: bool = True) -> T | None:
    """``request()`` under the failure policy; its result, or None for a miss, a skip or a failure.

    ``action`` is ``"read"`` or ``"write"``; ``key`` names the object for messages. With ``wait``
    (the caller is the job's own thread), the request runs in a worker thread and the caller waits
    at most for the budget left; without it (the caller is already a background thread that the
    job waits on with its own bound), it runs inline under a deadline of the budget left.
    Never raises for anything the store or the object does.
    """
    if settings.remote and not remote_usable(settings, action):
        return None
    limit = budget_left(settings)
    call_deadline = deadline.Deadline(limit, f"the store wait budget (BUNDLER_PULL_BUDGET={settings.pull_budget:g})")
    started = _clock()
    try:
        if wait:
            return _in_worker(request, call_deadline, limit)
        with deadline.scope(call_deadline):
            return request()
    except NotFoundError:
        return None
    except BundleError as exc:  # rule 4: the object's fault, not the store's
        log.warning("%s in %s is unusable (%s); treating it as a miss", _short(key), settings.remote, _reason(exc))
        log.debug("unusable object %s", key, exc_info=exc)
        return None
    except (StoreError, TimeoutError, OSError) as exc:
        if settings.remote:
            remote_failed(settings, action, key, exc)
        else:  # a store the caller opened itself: no process-wide state to keep
            log.warning("%s of %s failed (%s); compiling without the store", action, _short(key), _reason(exc))
        return None
    except Exception as exc:  # noqa: BLE001 - the cache is an accelerator: nothing here may fail the job
        log.warning("%s of %s in %s failed unexpectedly (%s); compiling without it", action, _short(key),
                    settings.remote, _reason(exc))
        log.debug("unexpected failure", exc_info=exc)
        return None
    finally:
        if wait:
            spend(settings, _clock() - started)


def _in_worker(request: Callable[[], T], call_deadline: deadline.Deadline, limit: float) -> T:
    """Run ``request`` in a daemon thread; wait for it at most ``limit`` seconds.

    The thread carries the caller's context (and so its deadline scope) plus ``call_deadline``;
    when the wait ends early the deadline is cancelled, so stream reads in the thread stop at their
    next check instead of reading on.
    """
    outcome: dict[str, Any] = {}
    done = threading.Event()
    context = contextvars.copy_context()

    def work() -> None:
        try:
            with deadline.scope(call_deadline):
                outcome["value"] = request()
        except BaseException as exc:  # handed to the waiting caller
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=context.run, args=(work,), name="bundler-store", daemon=True).start()
    if not done.wait(limit):
        call_deadline.cancel()
        raise DeadlineExceededError(f"no answer within the {limit:.1f} s left of the store wait budget")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _reason(exc: BaseException) -> str:
    """One short phrase for a warning line (the whole story goes to DEBUG): our errors by their
    message's first clause, anything else by its class and message, cut at 56 characters."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if not isinstance(exc, StoreError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    else:
        text = text.split(";")[0]
    return text if len(text) <= 56 else text[:53] + "..."


def _short(key: str) -> str:
    return key if len(key) <= 48 else f"{key[:22]}...{key[-22:]}"


def _short_url(url: str) -> str:
    """The store URL without its query (``?endpoint=...``), which makes lines long and says little."""
    return url.split("?", 1)[0]


def reset() -> None:
    """Forget opened stores, failures and spent budget (tests, or after changing credentials)."""
    _opened.cache_clear()
    _health.forget()


def _after_fork_in_child() -> None:
    # The child keeps what the parent learned about the remote's health, but not its connections.
    _opened.cache_clear()
    _health.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
