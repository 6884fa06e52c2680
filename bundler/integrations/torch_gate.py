"""Hold Inductor's first compile until the session's bundle is in place.

The torch session fetches its bundle on a background thread, so the download and unpack overlap
whatever the job does before its first compile: building the model, starting data loaders,
initialising the process group, and Dynamo's own tracing of the first frame. Inductor must not
look into its caches before the bundle has landed, or it misses and compiles what the bundle
holds. The gate wraps ``torch._inductor.compile_fx.compile_fx``, the one entry every
``torch.compile(backend="inductor")`` passes through after Dynamo has traced a frame and before
any AOTAutograd or FX graph cache lookup (``torch/__init__.py``'s ``_TorchCompileInductorWrapper``
and ``torch/_dynamo/backends/inductor.py`` both import it at call time, so the wrapper is what
they call). While nothing is pending the wrapper costs one list check per compiled graph.

A fetch that is still running after its wait limit is left to finish on its own: the compile goes
ahead and misses (a warning says so), which is the failure policy everywhere: the cache is never
a dependency.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
#: (ready event, seconds to wait at most, what to name in messages) per fetch not yet awaited.
_pending: list[tuple[threading.Event, float, str]] = []
#: Seconds a compile was held for each ready event (read by the session's summary).
_held_s: dict[threading.Event, float] = {}


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker, say) has no fetch thread: nothing it could wait for.
    Its lock is new too, in case the fork came while another thread held the parent's."""
    global _lock
    _lock = threading.Lock()
    _pending.clear()
    _held_s.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def hold_until(ready: threading.Event, limit_s: float, what: str) -> None:
    """Make Inductor's next compile wait (at most ``limit_s``) until ``ready`` is set."""
    _install()
    with _lock:
        _pending.append((ready, limit_s, what))


def release(ready: threading.Event) -> None:
    """Forget ``ready`` (its session ended); the gate no longer waits for it."""
    with _lock:
        _pending[:] = [item for item in _pending if item[0] is not ready]
        _held_s.pop(ready, None)


def held_s(ready: threading.Event) -> float:
    """How long compiles waited for ``ready`` (0.0 when they never had to)."""
    return _held_s.get(ready, 0.0)


def wait_pending() -> None:
    """Block until every pending fetch is done or out of time; then the gate is open."""
    with _lock:
        waiting = list(_pending)
        _pending.clear()
    for ready, limit_s, what in waiting:
        if ready.is_set():
            continue
        log.info("torch compile cache: first compile waits for %s", what)
        started = time.monotonic()
        arrived = ready.wait(limit_s)
        _held_s[ready] = time.monotonic() - started
        if not arrived:
            log.warning("torch compile cache: %s still not in place after %.0f s; compiling without it",
                        what, _held_s[ready])


def _install() -> None:
    """Wrap ``compile_fx`` once per process (idempotent; the wrapper stays, empty gates are free)."""
    import torch._inductor.compile_fx as compile_fx_module

    with _lock:
        current = compile_fx_module.compile_fx
        if getattr(current, "__bundler_gate__", False):
            return
        compile_fx_module.compile_fx = _gated(current)


def _gated(compile_fx: Any) -> Any:
    @functools.wraps(compile_fx)
    def compile_fx_after_bundle(*args: Any, **kwargs: Any) -> Any:
        if _pending:
            wait_pending()
        return compile_fx(*args, **kwargs)

    compile_fx_after_bundle.__bundler_gate__ = True  # type: ignore[attr-defined]
    return compile_fx_after_bundle
