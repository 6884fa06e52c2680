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

A second, later gate holds only Inductor's precompiled-header build. The header layer is one
file of ~150 MB (nearly all the bytes a CPU bundle unpacks) that a warm start reads only when it
loads its first C++ kernel, after the cache lookups and after preprocessing the header to key it.
So the session pulls that layer as a bundle of its own, after releasing the first gate, and the
header gate wraps ``codecache.write`` and waits only when Inductor writes into its header folder
(``codecache._HEADER_DIR``), the step right before it would build a missing header. ``write`` runs
in the job's process only (unlike ``_worker_compile_cpp``, which Inductor pickles into its compile
workers), and the wrapper costs one list check per generated file while nothing is pending.

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
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
#: (ready event, seconds to wait at most, what to name in messages) per fetch not yet awaited.
_pending: list[tuple[threading.Event, float, str]] = []
#: The same for precompiled headers: awaited by the first header build, not the first compile.
_headers_pending: list[tuple[threading.Event, float, str]] = []
#: Seconds a compile was held for each ready event (read by the session's summary).
_held_s: dict[threading.Event, float] = {}
#: Called once each, on the job's thread, when the next compile returns (they must be quick).
_after_compile: list[Callable[[], None]] = []


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker, say) has no fetch thread: nothing it could wait for.
    Its lock is new too, in case the fork came while another thread held the parent's."""
    global _lock
    _lock = threading.Lock()
    _pending.clear()
    _headers_pending.clear()
    _held_s.clear()
    _after_compile.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def hold_until(ready: threading.Event, limit_s: float, what: str) -> None:
    """Make Inductor's next compile wait (at most ``limit_s``) until ``ready`` is set."""
    _install()
    with _lock:
        _pending.append((ready, limit_s, what))


def hold_headers_until(ready: threading.Event, limit_s: float, what: str) -> bool:
    """Make Inductor's next precompiled-header build wait (at most ``limit_s``) until ``ready``.

    False where this torch lacks the seam (no ``codecache.write`` or ``_HEADER_DIR``): the caller
    then has the first compile wait for the headers instead, as it waits for the main bundle.
    """
    try:
        from torch._inductor import codecache
    except Exception:  # noqa: BLE001 - private torch API
        return False
    header_dir = getattr(codecache, "_HEADER_DIR", None)
    if not callable(getattr(codecache, "write", None)) or not isinstance(header_dir, str):
        return False
    with _lock:
        current = codecache.write
        if not getattr(current, "__bundler_gate__", False):
            codecache.write = _gated_header_write(current, codecache)
        _headers_pending.append((ready, limit_s, what))
    return True


def after_next_compile(callback: Callable[[], None]) -> None:
    """Call ``callback`` (once, on the job's thread) when Inductor's next compile returns.

    The torch session uses it to start pushing the precompiled headers while the job goes on:
    the header exists once the first graph with C++ code compiled.
    """
    _install()
    with _lock:
        _after_compile.append(callback)


def forget_callback(callback: Callable[[], None]) -> None:
    with _lock:
        _after_compile[:] = [item for item in _after_compile if item is not callback]


def release(ready: threading.Event) -> None:
    """Forget ``ready`` (its session ended); the gates no longer wait for it."""
    with _lock:
        _pending[:] = [item for item in _pending if item[0] is not ready]
        _headers_pending[:] = [item for item in _headers_pending if item[0] is not ready]
        _held_s.pop(ready, None)


def held_s(ready: threading.Event) -> float:
    """How long compiles waited for ``ready`` (0.0 when they never had to)."""
    return _held_s.get(ready, 0.0)


def wait_pending() -> None:
    """Block until every pending fetch is done or out of time; then the gate is open."""
    _wait(_pending, "first compile")


def _wait(pending: list[tuple[threading.Event, float, str]], who: str) -> None:
    with _lock:
        waiting = list(pending)
        pending.clear()
    for ready, limit_s, what in waiting:
        if ready.is_set():
            continue
        log.info("torch compile cache: %s waits for %s", who, what)
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
        compiled = compile_fx(*args, **kwargs)
        if _after_compile:
            _run_after_compile()
        return compiled

    compile_fx_after_bundle.__bundler_gate__ = True  # type: ignore[attr-defined]
    return compile_fx_after_bundle


def _run_after_compile() -> None:
    with _lock:
        callbacks = list(_after_compile)
        _after_compile.clear()
    for callback in callbacks:
        try:
            callback()
        except Exception as exc:  # noqa: BLE001 - the cache is never a reason to fail a compile
            log.warning("torch compile cache: %s after a compile failed: %s", getattr(callback, "__name__", callback), exc)


def _gated_header_write(write: Any, codecache: Any) -> Any:
    @functools.wraps(write)
    def write_after_headers(*args: Any, **kwargs: Any) -> Any:
        if _headers_pending and kwargs.get("specified_dir") == getattr(codecache, "_HEADER_DIR", None):
            _wait(_headers_pending, "precompiled header build")
        return write(*args, **kwargs)

    write_after_headers.__bundler_gate__ = True  # type: ignore[attr-defined]
    return write_after_headers
