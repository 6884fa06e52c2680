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

Every compile that starts while a fetch is pending waits, whichever thread it runs on: an entry
leaves the pending list only once its event is set or its time limit (counted from the first
compile that waited for it) has passed, never merely because another thread is already waiting.

The header gate's wrapper also records every header path Inductor writes into its header folder
(:func:`header_writes`), present or not: those are the headers this process's compiles use, and
the only ones a session bundles from a folder every job of the user shares.

A fetch that is still running after its wait limit is left to finish on its own: the compile goes
ahead and misses (a warning says so), which is the failure policy everywhere: the cache is never
a dependency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)



@dataclasses.dataclass(eq=False)
class _Hold:
    """One fetch a compile must wait for: its event, the wait limit, what messages call it, and
    the deadline, fixed when the first compile starts waiting for it."""

    ready: threading.Event
    limit_s: float
    what: str
    deadline: float | None = None


_lock = threading.Lock()
#: Fetches not yet in place or given up: every compile waits for them.
_pending: list[_Hold] = []
#: The same for precompiled headers: awaited by header builds, not the first compile.
_headers_pending: list[_Hold] = []
#: Header paths Inductor wrote (or found present) in its header folder, in order; append only.
_header_writes: list[str] = []
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
    _header_writes.clear()
    _held_s.clear()
    _after_compile.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def hold_until(ready: threading.Event, limit_s: float, what: str) -> None:
    """Make Inductor's next compile wait (at most ``limit_s``) until ``ready`` is set."""
    _install()
    with _lock:
        _pending.append(_Hold(ready, limit_s, what))


def hold_headers_until(ready: threading.Event, limit_s: float, what: str) -> bool:
    """Make Inductor's next precompiled-header build wait (at most ``limit_s``) until ``ready``.

    False where this torch lacks the seam (no ``codecache.write`` or ``_HEADER_DIR``): the caller
    then has the first compile wait for the headers instead, as it waits for the main bundle.
    """
    if not watch_headers():
        return False
    with _lock:
        _headers_pending.append(_Hold(ready, limit_s, what))
    return True


def watch_headers() -> bool:
    """Record, from now on, the headers Inductor writes into its header folder (:func:`header_writes`);
    False where this torch lacks the seam (no ``codecache.write`` or ``_HEADER_DIR``)."""
    codecache = _codecache()
    with _lock:
        if codecache is None:
            return False
        _install_header_write(codecache)
    return True


def header_writes() -> list[str]:
    """The header paths Inductor wrote, or found already there, in its header folder since
    :func:`watch_headers` (each once). Inductor prepares a header once per process
    (``_precompile_header`` is cached), so this is per process, not per session."""
    with _lock:
        return list(dict.fromkeys(_header_writes))


def _codecache() -> Any:
    """``torch._inductor.codecache`` where it has the header seam, else None (imported before any
    lock is taken: an import under a lock can deadlock with another thread's import)."""
    try:
        from torch._inductor import codecache
    except Exception:  # noqa: BLE001 - private torch API
        return None
    if not callable(getattr(codecache, "write", None)) or not isinstance(getattr(codecache, "_HEADER_DIR", None), str):
        return None
    return codecache


def _install_header_write(codecache: Any) -> None:
    """Wrap ``codecache.write`` once per process (call with ``_lock`` held)."""
    current = codecache.write
    if not getattr(current, "__bundler_gate__", False):
        codecache.write = _gated_header_write(current, codecache)


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
        _pending[:] = [hold for hold in _pending if hold.ready is not ready]
        _headers_pending[:] = [hold for hold in _headers_pending if hold.ready is not ready]
        _held_s.pop(ready, None)


def held_s(ready: threading.Event) -> float:
    """How long compiles waited for ``ready`` (0.0 when they never had to)."""
    return _held_s.get(ready, 0.0)


def wait_pending() -> None:
    """Block until every pending fetch is done or out of time; then the gate is open."""
    _wait(_pending, "first compile")


def _wait(pending: list[_Hold], who: str) -> None:
    """Wait for every pending fetch: until it is in place or its deadline passed.

    An entry stays pending while it is neither, so a compile on another thread that starts
    meanwhile waits too; the thread that finds it done (or out of time) removes it, and warns once.
    """
    with _lock:
        now = time.monotonic()
        waiting = list(pending)
        for hold in waiting:
            if hold.deadline is None:
                hold.deadline = now + hold.limit_s
    for hold in waiting:
        if hold.ready.is_set():
            continue
        log.info("torch compile cache: %s waits for %s", who, hold.what)
        started = time.monotonic()
        hold.ready.wait(max(0.0, (hold.deadline or started) - started))
        held = time.monotonic() - started
        with _lock:
            _held_s[hold.ready] = max(held, _held_s.get(hold.ready, 0.0))
    with _lock:
        now = time.monotonic()
        over = [hold for hold in waiting if hold in pending
                and (hold.ready.is_set() or now >= (hold.deadline or now))]
        pending[:] = [hold for hold in pending if hold not in over]
    for hold in over:
        if not hold.ready.is_set():
            log.warning("torch compile cache: %s still not in place after %.0f s; compiling without it",
                        hold.what, hold.limit_s)


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
        into_headers = kwargs.get("specified_dir") == getattr(codecache, "_HEADER_DIR", None)
        if into_headers and _headers_pending:
            _wait(_headers_pending, "precompiled header build")
        written = write(*args, **kwargs)
        if into_headers:
            with contextlib.suppress(Exception):  # another torch's return value: nothing recorded
                _header_writes.append(str(written[1]))  # (key, path): the .h; its build is <path>.gch
        return written

    write_after_headers.__bundler_gate__ = True  # type: ignore[attr-defined]
    return write_after_headers
