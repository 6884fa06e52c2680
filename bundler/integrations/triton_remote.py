"""Triton's remote cache backend on our stores: ``TRITON_REMOTE_CACHE_BACKEND``.

Triton's ``RemoteCacheManager`` fetches each kernel file from a backend, one request per file,
and materialises it in the local cache. Point it at any ``BUNDLER_REMOTE`` store::

    TRITON_CACHE_MANAGER=triton.runtime.cache:RemoteCacheManager
    TRITON_REMOTE_CACHE_BACKEND=bundler.integrations.triton_remote:StoreRemoteCacheBackend

Objects go to ``v1/triton/<triton-key>/<file>``. Prefer compile-session bundles where you can:
a kernel is about eight files, and on moto over loopback one request per file was 30x slower
than one streamed bundle (``shared/fixtures/README.md``). This backend suits long-lived shared
caches where no compile boundary exists.

Failure policy: a store error is one warning, after which the backend answers "not found" for
the rest of the process (the same circuit breaker as the per-kernel autotune cache), so Triton
compiles as if the remote were empty.
"""

from __future__ import annotations

import logging

from triton.runtime.cache import RemoteCacheBackend

from bundler.autotune import remote_failed, remote_usable, shared_store
from bundler.config import Settings
from bundler.errors import ConfigError, NotFoundError
from bundler.stores import layout

log = logging.getLogger(__name__)

TRITON_PREFIX = f"{layout.LAYOUT_VERSION}/triton/"


def triton_object_key(key: str, filename: str) -> str:
    """The store key of one Triton cache file, validated like every name we turn into a key."""
    return TRITON_PREFIX + layout.check_name(f"{key}/{filename}", "Triton cache file")


class StoreRemoteCacheBackend(RemoteCacheBackend):
    """One Triton cache key's files in the store named by ``BUNDLER_REMOTE``."""

    def __init__(self, key: str) -> None:
        self._key = key
        try:
            self._settings: Settings | None = Settings.from_env()
        except ConfigError as exc:
            log.warning("Triton remote cache off: %s", exc)
            self._settings = None

    def _usable(self) -> bool:
        return self._settings is not None and remote_usable(self._settings)

    def get(self, filenames: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for filename in filenames:
            if not self._usable():
                break
            object_key = triton_object_key(self._key, filename)
            try:
                found[filename] = shared_store(self._settings).read_bytes(object_key)
            except NotFoundError:
                continue
            except Exception as exc:
                remote_failed(self._settings, "read", object_key, exc)  # type: ignore[arg-type]
        return found

    def put(self, filename: str, data: bytes) -> None:
        if not self._usable():
            return
        object_key = triton_object_key(self._key, filename)
        try:
            # Same key, same bytes: Triton's keys hash everything that shapes the output.
            shared_store(self._settings).write_bytes(object_key, bytes(data), if_absent=True)
        except Exception as exc:
            remote_failed(self._settings, "write", object_key, exc)  # type: ignore[arg-type]
