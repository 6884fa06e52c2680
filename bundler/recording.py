"""What this process read from and wrote to the local caches: the raw material of bundles.

Every autotune record saved or hit, and every Triton kernel cache file produced or found, is
*recorded* here under its bundle member name (``autotune/<key>.json``, ``triton/<hash>/<file>``).
Two consumers read the records:

* ``bundler.artifacts.save_artifacts()`` packs everything the process recorded;
* a compile session (``bundler.session``) attaches a :class:`Recorder` while it is open and packs
  what was recorded during it.

Recording hits as well as writes matters: a new model that reuses kernels an old one compiled
would otherwise bundle only its new kernels, and the next fresh node would recompile the old ones.

This module sits below the autotune cache and the Triton integration (both call :func:`record`)
and knows nothing about stores or archives. It is thread-safe because Triton compiles kernels
from worker threads, and fork-safe because PyTorch's DataLoader forks workers while a session's
fetch thread may be recording: a child gets new locks instead of ones held by a thread it lacks.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from bundler.config import Settings
from bundler.relocate import is_group_file, to_portable

log = logging.getLogger(__name__)

#: First component of a bundle member name -> which local cache it belongs to.
AUTOTUNE_ROOT = "autotune"
TRITON_ROOT = "triton"

#: A member's content: a file read when the bundle is packed, or bytes captured when recorded.
Source = Path | bytes


def dest_mapping(settings: Settings) -> dict[str, Path]:
    """Where each bundle root unpacks: the ``dest`` argument of ``archive.unpack``."""
    return {AUTOTUNE_ROOT: autotune_dir(settings), TRITON_ROOT: Path(settings.triton_cache_dir)}


def autotune_dir(settings: Settings) -> Path:
    return Path(settings.cache_dir) / AUTOTUNE_ROOT


def member_name(path: str | os.PathLike[str], settings: Settings) -> str | None:
    """The bundle member name of a file inside one of the local caches, else None."""
    resolved = Path(os.path.abspath(path))
    for root, directory in dest_mapping(settings).items():
        try:
            rel = resolved.relative_to(os.path.abspath(directory))
        except ValueError:
            continue
        if rel.parts:
            return f"{root}/{rel.as_posix()}"
    return None


def local_path(name: str, settings: Settings) -> Path:
    """Where bundle member ``name`` lives in the local caches (the inverse of member_name)."""
    root, _, rel = name.partition("/")
    return dest_mapping(settings)[root] / rel


def source_for(name: str, path: str | os.PathLike[str]) -> Source:
    """What to record for the file at ``path``: group files as portable bytes, others by path.

    Group files are small and hold absolute paths, so they are captured now in their
    path-free form (see ``bundler.relocate``); kernel binaries are read only when a bundle is packed.
    """
    if is_group_file(name):
        return to_portable(Path(path).read_bytes())
    return Path(path)


class Recorder:
    """A set of bundle members, last write wins (a re-saved autotune record replaces the old one)."""

    def __init__(self) -> None:
        self._entries: dict[str, Source] = {}
        self._lock = threading.Lock()

    def add(self, name: str, source: Source) -> None:
        with self._lock:
            self._entries[name] = source

    def entries(self) -> dict[str, Source]:
        with self._lock:
            return dict(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def after_fork(self) -> None:
        self._lock = threading.Lock()


_process = Recorder()
_active: list[Recorder] = []
_active_lock = threading.Lock()


def record(name: str, source: Source) -> None:
    """Note one member for the process (artifacts) and every attached recorder (sessions)."""
    _process.add(name, source)
    with _active_lock:
        listeners = list(_active)
    for recorder in listeners:
        recorder.add(name, source)


def record_file(path: str | os.PathLike[str], settings: Settings) -> str | None:
    """Record a file that lives in one of the local caches; returns its member name, or None."""
    name = member_name(path, settings)
    if name is None:
        log.debug("not recording %s: outside the local caches of %s", path, settings.cache_dir)
        return None
    record(name, source_for(name, path))
    return name


def record_member(name: str, settings: Settings, into: Recorder | None = None) -> Path:
    """Record bundle member ``name`` where it now lies in the local caches (after an unpack).

    ``into``: the pulling session's recorder, the only session that gets it (with the process's
    artifacts). Another session open at the same time did not produce or use this file; fed to it,
    that session would push a bundle holding the other's kernels under its own key.
    """
    path = local_path(name, settings)
    source = source_for(name, path)
    if into is None:
        record(name, source)
    else:
        _process.add(name, source)
        into.add(name, source)
    return path


def process_entries() -> dict[str, Source]:
    """Everything recorded in this process so far."""
    return _process.entries()


@contextmanager
def attached(recorder: Recorder) -> Iterator[Recorder]:
    """Feed ``recorder`` with everything recorded while the block runs (any thread)."""
    attach(recorder)
    try:
        yield recorder
    finally:
        detach(recorder)


def attach(recorder: Recorder) -> None:
    with _active_lock:
        _active.append(recorder)


def detach(recorder: Recorder) -> None:
    with _active_lock:
        if recorder in _active:
            _active.remove(recorder)


_waiters: list[Callable[[], None]] = []
_local = threading.local()


@contextmanager
def fetching() -> Iterator[None]:
    """Mark the running thread as a fetch thread while the block runs: its cache reads do not wait.

    A session's fetch thread reads the local caches itself (deriving the key starts Triton's driver,
    which looks up its ``cuda_utils`` helper through the cache manager). Waiting there for pending
    fetches would make it wait for itself (or for another session's fetch, which may be waiting
    for it), so :func:`wait_for_pending` returns at once on such a thread.
    """
    previous = getattr(_local, "fetching", False)
    _local.fetching = True
    try:
        yield
    finally:
        _local.fetching = previous


def in_fetch() -> bool:
    """Whether the running thread is a fetch thread (see :func:`fetching`)."""
    return bool(getattr(_local, "fetching", False))


def add_waiter(wait: Callable[[], None]) -> None:
    """Register a wait that cache readers must honour (a session's in-flight bundle fetch)."""
    with _active_lock:
        _waiters.append(wait)


def remove_waiter(wait: Callable[[], None]) -> None:
    with _active_lock:
        if wait in _waiters:
            _waiters.remove(wait)


def wait_for_pending() -> None:
    """Block until in-flight fetches into the local caches settle (each bounded by its budget).

    Called by every reader of the local caches (autotune records, Triton's cache manager) before
    it looks, so a ``begin_compile`` that returned at once still gets its bundle used. On a fetch
    thread it returns at once (see :func:`fetching`).
    """
    if in_fetch():
        return
    with _active_lock:
        waits = list(_waiters)
    for wait in waits:
        wait()


def still_existing(entries: Mapping[str, Source]) -> dict[str, Source]:
    """``entries`` without files that vanished since they were recorded (a cleaned cache).

    A bundle must hold only what exists now; a missing file is a warning, not a failed push.
    """
    kept: dict[str, Source] = {}
    for name, source in sorted(entries.items()):
        if isinstance(source, Path) and not source.is_file():
            log.warning("%s was recorded but no longer exists; leaving it out of the bundle", source)
            continue
        kept[name] = source
    return kept


def _after_fork_in_child() -> None:
    """Replace every lock a thread of the parent may have held when the process forked."""
    global _active_lock
    _active_lock = threading.Lock()
    _process.after_fork()
    for recorder in _active:
        recorder.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
