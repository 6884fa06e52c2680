"""A Triton cache manager that records the kernel files each compile stores or finds.

Triton resolves its cache manager class on every compile from ``knobs.cache.manager_class``
(environment ``TRITON_CACHE_MANAGER``). :func:`install` points it at
:class:`RecordingCacheManager`, which delegates every call to the manager that was configured
before (``FileCacheManager`` by default, ``RemoteCacheManager`` when the user set one up) and
records, into ``bundler.recording``, each file that was

* stored: ``put`` / ``put_group`` (a fresh compile: ttir, ttgir, llir, ptx, cubin, json, group),
* found: ``get_group`` / ``get_file`` hits (a kernel compiled by an earlier process, and Triton's
  own ``<fn>.autotune.json`` result files from ``cache_results=True``).

Recording hits is what makes a compile session's bundle complete when the local cache was
already warm. Readers first wait for an in-flight bundle fetch (``recording.wait_for_pending``),
so a kernel that the bundle brings is found instead of recompiled. Override and dump managers
(``TRITON_KERNEL_OVERRIDE``/``TRITON_KERNEL_DUMP``) are debugging aids and are never recorded.

Equivalent without code: ``TRITON_CACHE_MANAGER=bundler.integrations.triton_cache:RecordingCacheManager``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from triton import knobs
from triton.runtime.cache import CacheManager, FileCacheManager

from bundler import recording
from bundler.relocate import GROUP_PREFIX

log = logging.getLogger(__name__)


class RecordingCacheManager(CacheManager):
    """Delegates to :attr:`inner_class` and records every file stored or found."""

    #: The manager doing the real work; :func:`install` sets it to whatever was configured before.
    inner_class: type[CacheManager] = FileCacheManager

    def __init__(self, key: str, override: bool = False, dump: bool = False) -> None:
        self.key = key
        self._recording = not (override or dump)
        self._inner = self.inner_class(key, override=override, dump=dump)

    def __getattr__(self, name: str) -> Any:
        # cache_dir, has_file, ... of the inner manager, for code that reaches past the ABC.
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def get_file(self, filename: str) -> str | None:
        self._wait()
        path = self._inner.get_file(filename)
        self._note(path)
        return path

    def put(self, data: Any, filename: str, binary: bool = True) -> str:
        path = self._inner.put(data, filename, binary=binary)
        self._note(path)
        return path

    def get_group(self, filename: str) -> dict[str, str] | None:
        self._wait()
        group = self._inner.get_group(filename)
        if group:
            self._note(os.path.join(knobs.cache.dir, self.key, f"{GROUP_PREFIX}{filename}"))
            for path in group.values():
                self._note(path)
        return group

    def put_group(self, filename: str, group: dict[str, str]) -> Any:
        result = self._inner.put_group(filename, group)
        self._note(os.path.join(knobs.cache.dir, self.key, f"{GROUP_PREFIX}{filename}"))
        return result

    def _wait(self) -> None:
        if self._recording:
            recording.wait_for_pending()

    def _note(self, path: str | None) -> None:
        if not (self._recording and path and os.path.isfile(path)):
            return
        rel = os.path.relpath(path, knobs.cache.dir)
        if rel.startswith(os.pardir):
            return
        name = f"{recording.TRITON_ROOT}/{rel.replace(os.sep, '/')}"
        try:
            recording.record(name, recording.source_for(name, path))
        except OSError as exc:  # a file removed between Triton's write and our read
            log.debug("not recording %s: %s", path, exc)


def install() -> None:
    """Make Triton use :class:`RecordingCacheManager` from now on (idempotent).

    The previously configured manager keeps doing the work, so ``TRITON_CACHE_MANAGER`` set to
    Triton's ``RemoteCacheManager`` still reaches its remote backend.
    """
    current = knobs.cache.manager_class
    if current is not None and issubclass(current, RecordingCacheManager):
        return
    RecordingCacheManager.inner_class = current or FileCacheManager
    knobs.cache.manager_class = RecordingCacheManager
    log.debug("Triton cache manager: recording around %s", RecordingCacheManager.inner_class.__name__)
