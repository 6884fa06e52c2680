"""Triton's remote cache backend on our stores: ``TRITON_REMOTE_CACHE_BACKEND``.

Triton's ``RemoteCacheManager`` fetches each kernel file from a backend, one request per file,
and materialises it in the local cache. Point it at any ``BUNDLER_REMOTE`` store::

    TRITON_CACHE_MANAGER=triton.runtime.cache:RemoteCacheManager
    TRITON_REMOTE_CACHE_BACKEND=bundler.integrations.triton_remote:StoreRemoteCacheBackend

Objects go to ``v1/triton/<triton-key>/<file>``. Prefer compile-session bundles where you can:
a kernel is about eight files, and on moto over loopback one request per file was 30x slower
than one streamed bundle (``shared/fixtures/README.md``). This backend suits long-lived shared
caches where no compile boundary exists.

Object names: Triton's key is a hash and its file names are short, but the backend must map *any*
name to a valid store key (an exception here would fail Triton's compile), so a name that is not a
plain file name, or is over 200 characters, is stored under ``sha256-<hash of the name>``.

Failure policy (``bundler.remote.health.guarded``, shared with the per-kernel autotune cache and
compile sessions): a dead or slow store costs at most the process's wait budget and one warning,
after which the remote is skipped and Triton compiles as if it were empty. An oversized or
otherwise unusable object is a miss for that file only; it says nothing about the store.

Signing: these objects are compiled GPU code, stored one file at a time with no signature, so they
cannot be verified. With any signing setting (``BUNDLER_SIGNING_KEY``, ``BUNDLER_SIGNING_KEY_FILE``,
``BUNDLER_TRUSTED_KEYS``) the backend therefore loads nothing (one
warning, then every lookup is a miss) and only writes; use signed compile-session bundles to share
kernels between nodes that require signatures.
"""

from __future__ import annotations

import hashlib
import logging

from triton.runtime.cache import RemoteCacheBackend

from bundler import logs
from bundler.config import Settings
from bundler.errors import ConfigError
from bundler.remote import layout
from bundler.remote.health import guarded, remote_usable, shared_store

log = logging.getLogger(__name__)

TRITON_PREFIX = f"{layout.LAYOUT_VERSION}/triton/"
HASHED_PREFIX = "sha256-"



def _segment(name: str) -> str:
    """``name`` as one valid key segment: itself when it is a plain short file name, else its hash.

    Names that already look hashed are hashed again, so two different names never share a key.
    """
    if "/" not in name and not name.startswith(HASHED_PREFIX):
        try:
            return layout.check_name(name, "Triton cache file")
        except ConfigError:
            pass
    return HASHED_PREFIX + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def triton_object_key(key: str, filename: str) -> str:
    """The store key of one Triton cache file; valid for every ``key`` and ``filename``."""
    return TRITON_PREFIX + layout.check_name(f"{_segment(key)}/{_segment(filename)}", "Triton cache file")


class StoreRemoteCacheBackend(RemoteCacheBackend):
    """One Triton cache key's files in the store named by ``BUNDLER_REMOTE``."""

    def __init__(self, key: str) -> None:
        self._key = key
        try:
            self._settings: Settings | None = Settings.from_env()
        except ConfigError as exc:
            log.warning("Triton remote cache off: %s", logs.one_line(exc))
            self._settings = None

    def _usable(self, action: str) -> bool:
        return self._settings is not None and remote_usable(self._settings, action)

    def get(self, filenames: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        if self._settings is not None and self._settings.signing_configured:
            _refuse_unsigned()
            return found
        for filename in filenames:
            if not self._usable("read"):
                break
            object_key = triton_object_key(self._key, filename)
            data = guarded(self._settings, "read", object_key,  # type: ignore[arg-type]
                           lambda key=object_key: shared_store(self._settings).read_bytes(key))
            if data is not None:
                found[filename] = data
        return found

    def put(self, filename: str, data: bytes) -> None:
        if not self._usable("write"):
            return
        object_key = triton_object_key(self._key, filename)
        # Same key, same bytes: Triton's keys hash everything that shapes the output.
        guarded(self._settings, "write", object_key,  # type: ignore[arg-type]
                lambda: shared_store(self._settings).write_bytes(object_key, bytes(data), if_absent=True))


def _refuse_unsigned() -> None:
    logs.warn_once(log, "Triton remote cache: signing is configured (BUNDLER_SIGNING_KEY / _FILE / "
                   "BUNDLER_TRUSTED_KEYS) and kernel files in the store are unsigned, so none are loaded")
