"""Triton integration: cached autotuning in one line, and kernel-cache capture for bundles.

Opt in by swapping the decorator::

    from bundler.integrations import triton as bt

    @bt.autotune(configs=[...], key=["n"])       # same arguments as triton.autotune
    @triton.jit
    def kernel(...): ...

or, for a kernel someone else decorated with ``triton.autotune``: ``bt.enable(kernel)``.
Either also calls :func:`install`, which makes Triton's cache manager record the kernel files it
stores and finds, so an open compile session (``bundler.compile_session``) bundles them.

How the autotuner is hooked, and why that way
    ``enable`` keeps Triton's own ``Autotuner`` and replaces only its ``cache`` dict (tuning key ->
    best config) with :class:`TuningResults`. Triton asks ``key not in self.cache`` before it
    benchmarks; our ``__contains__`` answers from :class:`~bundler.autotune.AutotuneCache` (local
    record, then the store) and, on a hit, fills the entry so Triton skips benchmarking. When
    Triton stores a winner after benchmarking, ``__setitem__`` saves it with the measured time.
    Triton 3.6 and 3.9 both use exactly these two operations, and no signature is copied, so every
    ``triton.autotune`` argument of either version passes through unchanged.

Which cache answers, when
    ======================================  =============================  ======================
    situation                               Triton ``cache_results=True``  kernel-bundler
    ======================================  =============================  ======================
    GPU, configs without ``pre_hook``       yes (``<fn>.autotune.json``)   yes (consulted first)
    GPU, a config with a ``pre_hook``       no: always re-benchmarks       yes
    ``TRITON_INTERPRET=1`` (CPU)            no: disabled in interpreter    yes
    a fresh node, empty local cache         only via a bundle              bundle or remote record
    ======================================  =============================  ======================

    Triton's result files live in its kernel cache, so compile sessions bundle them (they are
    recorded when written or read) and they come back with the bundle. Ours are keyed by the
    kernel's code (see below), the tuning key, Triton version and backend; Triton's by its full
    compiler hash. Both being present is harmless: ours is asked first and Triton's is then never
    read.

What "the kernel's code" is
    The ``JITFunction``'s own ``cache_key`` where it has one (compiled kernels, Triton 3.6 and 3.9):
    Triton hashes into it every ``@triton.jit`` helper the kernel calls and every ``constexpr``
    global it reads, so changing a helper retunes. It also covers comments and the line number,
    which costs a retune after an edit above the kernel; that is cheaper than a stale winner.
    Under ``TRITON_INTERPRET=1`` there is no ``JITFunction`` and so no dependency hash: the key is
    then the comment-blind hash of the kernel's own source (``keys.code_hash``).

The kernel cache itself (ttir ... cubin, group files) is not available under the interpreter:
interpreted kernels are not compiled. On GPUs it is recorded by
:class:`~bundler.integrations.triton_cache.RecordingCacheManager` and relocated on unpack by
:class:`~bundler.relocate.GroupFileRewriter`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from bundler import keys, logs
from bundler.autotune import AutotuneCache, configs_hash
from bundler.config import Settings
from bundler.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["TuningResults", "autotune", "enable", "install"]


def install() -> None:
    """Record Triton kernel cache files for compile sessions and artifacts (idempotent)."""
    from bundler.integrations.triton_cache import install as install_manager

    install_manager()


def autotune(configs: Sequence[Any], key: Sequence[str], *args: Any, settings: Settings | None = None,
             **kwargs: Any) -> Callable[[Any], Any]:
    """``triton.autotune`` with kernel-bundler's best-config cache in front of the benchmarks.

    Takes ``triton.autotune``'s arguments (whatever the installed Triton accepts) plus
    ``settings`` (default ``Settings.from_env()`` when the kernel first runs).
    """
    import triton

    def decorator(fn: Any) -> Any:
        return enable(triton.autotune(configs, key, *args, **kwargs)(fn), settings=settings)

    return decorator


def enable(tuner: Any, *, settings: Settings | None = None) -> Any:
    """Put the best-config cache in front of an existing ``triton.autotune`` kernel; returns it."""
    logs.from_env()  # BUNDLER_LOG: a job that only decorates kernels still gets our log lines
    if not isinstance(tuner.cache, TuningResults):
        tuner.cache = TuningResults(tuner, settings, tuner.cache)
    install()
    return tuner


class TuningResults(dict):
    """An ``Autotuner.cache`` that consults and fills :class:`AutotuneCache` (see module doc).

    One ``AutotuneCache`` per tuning key: the tuning key (argument values named by ``key=`` plus
    tensor dtypes) is part of the cached kernel's identity, exactly as it is for Triton.
    """

    def __init__(self, tuner: Any, settings: Settings | None, initial: dict | None = None) -> None:
        super().__init__(initial or {})
        self._tuner = tuner
        self._settings = settings
        self._identity: tuple[str, str, str] | None = None
        self._pending: dict[Any, AutotuneCache] = {}  # tuning keys we missed, awaiting a winner

    def __contains__(self, tuning_key: object) -> bool:
        if dict.__contains__(self, tuning_key):
            return True
        cache = self._cache_for(tuning_key)
        best = self._read(cache)
        if best is None:
            if cache is not None:
                self._pending[tuning_key] = cache
            self._tuner.bench_time = None  # so __setitem__ can tell a fresh benchmark from none
            return False
        dict.__setitem__(self, tuning_key, best)
        return True

    def __setitem__(self, tuning_key: Any, config: Any) -> None:
        dict.__setitem__(self, tuning_key, config)
        cache = self._pending.pop(tuning_key, None)
        if cache is None:
            return
        # bench_time is set (seconds) when Triton benchmarked; None when a single surviving config
        # or Triton's own result file decided. Saved either way: the next process skips both.
        seconds = getattr(self._tuner, "bench_time", None) or 0.0
        try:
            cache.save(config, int(seconds * 1e9), found_by_coordesc=getattr(config, "found_by_coordesc", False))
        except Exception as exc:
            log.warning("autotune cache: could not save the winner of %s (%s)", self._kernel_name(), logs.one_line(exc))

    def _read(self, cache: AutotuneCache | None) -> Any:
        if cache is None:
            return None
        try:
            return cache.read_best(self._tuner.configs)
        except Exception as exc:  # never let a cache problem stop the kernel
            log.warning("autotune cache: lookup for %s failed (%s); benchmarking", self._kernel_name(), logs.one_line(exc))
            return None

    def _cache_for(self, tuning_key: object) -> AutotuneCache | None:
        if len(self._tuner.configs) <= 1:
            return None
        identity = self._kernel_identity()
        if identity is None:
            return None
        name, filename, source = identity
        meta = {"kernel": name, "source": source, "tuning_key": tuning_key, **self._tuner_setup()}
        try:
            return AutotuneCache.create(meta, filename, configs_hash(self._tuner.configs), settings=self._settings)
        except TypeError:
            log.debug("tuning key %r of %s is not JSON; not cached", tuning_key, name)
            return None

    def _tuner_setup(self) -> dict[str, object]:
        """What makes two autotuners over one kernel choose differently from the same candidates:
        the arguments the tuning key names, and how configs are pruned before benchmarking.

        Without it, a tuner that prunes to configs fitting shared memory and one that does not
        would share records: the pruning one could load a winner its prune rejects, and the
        other one a winner chosen from a pruned list without a benchmark.
        """
        tuner = self._tuner

        def named(fn: object) -> str | None:
            if fn is None:
                return None
            return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"

        setup: dict[str, object] = {"key_args": [str(k) for k in getattr(tuner, "keys", ()) or ()]}
        prune, model = getattr(tuner, "early_config_prune", None), getattr(tuner, "perf_model", None)
        if prune is not None or model is not None:
            setup["prune"] = [named(prune), named(model), getattr(tuner, "configs_top_k", None)]
        return setup

    def _kernel_identity(self) -> tuple[str, str, str] | None:
        """(qualified name, source file, code hash: see the module doc), computed once per kernel."""
        if self._identity is None:
            fn = self._tuner.base_fn
            try:
                if self._settings is None:
                    self._settings = Settings.from_env()
                source = _jit_cache_key(self._tuner.fn) or keys.code_hash(inspect.getsource(fn))
                filename = inspect.getsourcefile(fn) or fn.__code__.co_filename
            except (OSError, TypeError, ConfigError) as exc:
                log.warning("autotune cache off for %s: %s", getattr(fn, "__qualname__", fn), logs.one_line(exc))
                self._identity = ("", "", "")
                return None
            self._identity = (f"{fn.__module__}.{fn.__qualname__}", filename, source)
        return self._identity if self._identity[0] else None

    def _kernel_name(self) -> str:
        return getattr(self._tuner.base_fn, "__qualname__", "kernel")


def _jit_cache_key(fn: Any) -> str | None:
    """Triton's dependency-aware hash of the ``JITFunction`` under ``fn`` (through heuristics
    wrappers), or None where there is none (the interpreter) or it cannot be computed."""
    for _ in range(8):  # autotune(heuristics(jit(f))) nests a few levels at most
        if fn is None or inspect.isfunction(fn):
            return None
        try:
            key = getattr(fn, "cache_key", None)
        except Exception as exc:  # computing it walks the kernel's globals; never fail the kernel
            log.debug("no Triton cache_key for %s (%s); using its source hash", fn, exc)
            return None
        if isinstance(key, str):
            return "triton-cache-key:" + key
        fn = getattr(fn, "fn", None)
    return None
