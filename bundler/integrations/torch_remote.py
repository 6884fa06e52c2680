"""Inductor's remote caches (FX graph, AOTAutograd, autotune, bundled autotune) on our stores.

Open-source Inductor ships only a Redis backend. Its remote caches take any
``RemoteCacheBackend`` (``_get`` / ``_put`` of bytes under a string key) through the class
attribute ``RemoteCache.backend_override_cls`` (torch 2.13 ``_inductor/remote_cache.py:157-167``)::

    from bundler.integrations import torch_remote
    torch_remote.install()            # BUNDLER_REMOTE names the store

Objects go to ``v1/inductor/<sha256 of Inductor's key>`` (Inductor's keys hold ``:``, which no
store key may). Each entry is one request: prefer per-job bundles (``compile_cache``) for warm
starts; this backend serves entry by entry where no job boundary exists, and it carries no C++
``.so`` (those are rebuilt from the cached source on a new node).

Turning the caches on **without changing any key**: Inductor's switches
(``fx_graph_remote_cache``, ``autotune_remote_cache``, ``bundled_autotune_remote_cache``) are
ordinary settings, and every Inductor setting is hashed into the FX graph key (``codecache.py:1504``),
so setting them (or ``TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE=1``) would make every bundle baked
without them miss; functorch's ``enable_remote_autograd_cache`` likewise changes every AOTAutograd
key. ``install`` leaves all settings alone and instead replaces the functions that *read* them
(``should_use_remote_fx_graph_cache`` where each module imported it,
``should_use_remote_autograd_cache``, ``_should_use_remote_autotune_cache`` and
``_AutotuneCacheBundlerImpl._should_use_bundled_autotune_remote_cache``). A setting the user set
explicitly to False still wins.

Guard: the bundled autotune cache asserts that ``inductor_meta["backend_hash"]`` is a string
(``runtime/autotune_cache.py:455-458``); on a machine without a Triton GPU driver it is None, so the
replacement answers False there instead of letting Inductor assert.

Versions: these are private APIs. ``install`` supports torch 2.13 (tested here: FX graph and
AOTAutograd entries served from moto with the local cache empty); on any other version it logs
one warning and installs nothing, and jobs compile as they would without it.

Failure policy and signing: as for the Triton backend (``bundler.remote.health.guarded``: a dead
store costs one warning; with a signing key configured nothing is loaded, since these objects are
unsigned code).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
from typing import Any

from bundler import logs
from bundler.config import Settings
from bundler.errors import ConfigError
from bundler.remote import layout
from bundler.remote.health import guarded, shared_store

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED_TORCH", "backend_class", "inductor_object_key", "install", "uninstall"]

SUPPORTED_TORCH = ("2.13.",)
INDUCTOR_PREFIX = f"{layout.LAYOUT_VERSION}/inductor/"
#: The largest entry read back (max-autotune FX pickles reach ~30 MB).
MAX_ENTRY_BYTES = 256 << 20

_CACHE_CLASSES = ("RemoteFxGraphCache", "RemoteAOTAutogradCache", "RemoteAutotuneCache",
                  "RemoteBundledAutotuneCache")
_saved: dict[tuple[Any, str], Any] = {}


def inductor_object_key(key: str) -> str:
    """The store key of one Inductor remote-cache entry."""
    return INDUCTOR_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _backend_base() -> type:
    from torch._inductor.remote_cache import RemoteCacheBackend

    return RemoteCacheBackend


@functools.cache
def backend_class() -> type:
    """The ``RemoteCacheBackend`` subclass :func:`install` plugs in (built at first use, so that
    importing this module does not import torch)."""
    base = _backend_base()

    class _StoreCacheBackend(base):  # type: ignore[misc, valid-type]
        """Bytes under Inductor's keys in the store named by ``BUNDLER_REMOTE``; Inductor builds
        one per cache object (``backend_override_cls()``)."""

        def __init__(self) -> None:
            super().__init__()
            try:
                self._settings: Settings | None = Settings.from_env()
            except ConfigError as exc:
                log.warning("Inductor remote cache off: %s", exc)
                self._settings = None

        def _get(self, key: str) -> bytes | None:
            settings = self._settings
            if settings is None or not settings.remote:
                return None
            if settings.signing_configured:
                _refuse_unsigned()
                return None
            object_key = inductor_object_key(key)
            return guarded(settings, "read", object_key,
                           lambda: shared_store(settings).read_bytes(object_key, limit=MAX_ENTRY_BYTES))

        def _put(self, key: str, data: bytes) -> None:
            settings = self._settings
            if settings is None or not settings.remote:
                return
            object_key = inductor_object_key(key)
            guarded(settings, "write", object_key,
                    lambda: shared_store(settings).write_bytes(object_key, bytes(data), if_absent=False))

    _StoreCacheBackend.__name__ = _StoreCacheBackend.__qualname__ = "StoreCacheBackend"
    return _StoreCacheBackend


def _refuse_unsigned() -> None:
    logs.warn_once(log, "Inductor remote cache: signing is configured and remote entries are unsigned code, "
                   "so none are loaded (use signed bundles: compile_cache)")


def install(*, fx_graph: bool = True, autograd: bool = True, autotune: bool = True) -> bool:
    """Serve Inductor's remote caches from ``BUNDLER_REMOTE``; True when installed (idempotent)."""
    import torch

    if not torch.__version__.startswith(SUPPORTED_TORCH):
        log.warning("Inductor remote cache backend supports torch %s only, not %s; not installed",
                    "/".join(v.rstrip(".") for v in SUPPORTED_TORCH), torch.__version__)
        return False
    if _saved:
        return True
    from torch._inductor import remote_cache

    backend = backend_class()
    for name in _CACHE_CLASSES:
        _patch(getattr(remote_cache, name), "backend_override_cls", backend)
    if fx_graph:
        _switch_on("should_use_remote_fx_graph_cache", "torch._inductor.config", "fx_graph_remote_cache",
                   ("torch._inductor.utils", "torch._inductor.compile_fx",
                    "torch._functorch._aot_autograd.autograd_cache",
                    "torch._functorch._aot_autograd.aot_autograd_result", "torch._dynamo.utils"))
    if autograd:
        _switch_on("should_use_remote_autograd_cache", "torch._functorch.config", "enable_remote_autograd_cache",
                   ("torch._functorch._aot_autograd.autograd_cache",
                    "torch._functorch._aot_autograd.graph_compile", "torch._functorch.aot_autograd"),
                   extra_check=_local_caches_on)
    if autotune:
        _install_autotune()
    log.info("Inductor remote caches served from BUNDLER_REMOTE (no setting changed)")
    return True


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    for (owner, name), value in reversed(list(_saved.items())):
        setattr(owner, name, value)
    _saved.clear()


def _patch(owner: Any, name: str, value: Any) -> None:
    if (owner, name) not in _saved:
        _saved[(owner, name)] = getattr(owner, name, None)
    setattr(owner, name, value)


def _local_caches_on() -> bool:
    import torch

    return not torch.compiler.config.force_disable_caches


def _switch_on(func: str, config_module: str, setting: str, modules: tuple[str, ...], extra_check=None) -> None:
    """Replace ``func`` in every module that bound it: on, unless the user set ``setting`` to False."""
    config = importlib.import_module(config_module)

    def should_use() -> bool:
        import torch

        if torch.compiler.config.force_disable_caches:
            return False
        if getattr(config, setting, None) is False:
            return False
        return extra_check() if extra_check else True

    for name in modules:
        module = importlib.import_module(name)
        if hasattr(module, func):
            _patch(module, func, should_use)


def _install_autotune() -> None:
    from torch._inductor.runtime import autotune_cache

    def remote_autotune(inductor_meta: dict) -> bool:
        if inductor_meta.get("autotune_remote_cache") is False:
            return False
        return isinstance(inductor_meta.get("backend_hash"), str)

    original = autotune_cache._AutotuneCacheBundlerImpl.__dict__["_should_use_bundled_autotune_remote_cache"]

    def bundled(cls: Any, inductor_meta: dict) -> bool:
        if not inductor_meta.get("autotune_local_cache", True):
            return False
        if inductor_meta.get("bundled_autotune_remote_cache") is False:
            return False
        # Inductor asserts on a missing backend hash (no Triton GPU driver): answer False instead.
        return isinstance(inductor_meta.get("backend_hash"), str)

    _patch(autotune_cache, "_should_use_remote_autotune_cache", remote_autotune)
    _saved.setdefault((autotune_cache._AutotuneCacheBundlerImpl, "_should_use_bundled_autotune_remote_cache"),
                      original)
    autotune_cache._AutotuneCacheBundlerImpl._should_use_bundled_autotune_remote_cache = classmethod(bundled)
