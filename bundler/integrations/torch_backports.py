"""Upstream Inductor fixes a warm start depends on, applied only where the running torch lacks them.

A bundle can only be as good as Inductor's own reuse of what it holds. One bug defeats it on the
torch users run today, so the torch session carries its fix:

**Coordinate descent re-runs on a warm cache** (pytorch#172819, fixed by pytorch#173391). When
Inductor reloads a statically launchable Triton kernel from an FX graph cache entry, it re-reads
the kernel's ``.best_config`` (``CachingAutotuner.recheck_autotune_cache``) but, when the cached
winner equals one of the precompiled configs or the kernel has a single config, it keeps the
compiled config *without* the ``found_by_coordesc`` mark, so ``CachingAutotuner.run`` tunes the
kernel again at every start. Measured on an H200 with torch 2.11 (``benchmarks/gpu_results.md``):
6 of 28 kernels of a 2-block transformer re-tuned on every warm start, and at another path the
timing-guided search wandered into configs nobody had compiled, so a fresh node built 12 Triton
kernels again: 43 s to the first result against 7.7 s for a warm start in place. torch 2.13 has
the fix; the check below looks for it in the installed method rather than trusting a version
number, so a patched 2.11 build is left alone.

The replacement is the fixed method's logic and nothing else; it changes no cache key, and
``BUNDLER_TORCH_BACKPORTS=0`` turns it off.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

#: Text only the fixed ``recheck_autotune_cache`` contains: it hands the cached mark to the
#: compiled config it keeps.
_FIX_MARKER = "compile_result.config.found_by_coordesc"
_installed: list[str] = []


def install() -> list[str]:
    """Apply every fix this torch lacks (once per process); the names of those applied."""
    if _installed:
        return list(_installed)
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except Exception as exc:  # noqa: BLE001 - a torch without Inductor's Triton runtime has nothing to fix
        log.debug("no Inductor Triton runtime to patch: %s", exc)
        return []
    if needs_coordesc_fix(getattr(CachingAutotuner, "recheck_autotune_cache", None)):
        CachingAutotuner.recheck_autotune_cache = recheck_autotune_cache
        _installed.append("pytorch#172819")
        log.info("torch compile cache: this torch re-runs coordinate descent on a warm cache "
                 "(pytorch#172819); applied the upstream fix for this process")
    return list(_installed)


@functools.cache  # a session per process start: read torch's source once, not at every begin
def needs_coordesc_fix(method: Any) -> bool:
    """True when ``method`` is the unfixed ``recheck_autotune_cache``; False when it is fixed,
    absent (older torch: no static launcher reload, no bug) or its source cannot be read."""
    if method is None or method is recheck_autotune_cache:
        return False
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return False
    return _FIX_MARKER not in source


def recheck_autotune_cache(self: Any, reload_kernel_from_src: Any) -> None:
    """``CachingAutotuner.recheck_autotune_cache`` as fixed upstream: after an FX graph cache hit,
    narrow a statically launched kernel to its cached best config, carrying the cached
    ``found_by_coordesc`` mark onto the compiled config so ``run`` does not tune it again, and
    compile the cached winner when no precompiled config is it (found by coordinate descent or
    a dynamically scaled block after the kernel was saved)."""
    from torch._inductor.runtime import triton_heuristics as th

    configs = [result.config for result in self.compile_results]
    cached, _, self.autotune_cache_info = th.check_autotune_cache(configs, self.filename, self.inductor_meta)
    if len(cached) != 1:
        return
    best = cached[0]
    wanted = th.triton_config_to_hashable(best)
    for result in self.compile_results:
        if th.triton_config_to_hashable(result.config) == wanted:
            result.config.found_by_coordesc = getattr(best, "found_by_coordesc", False)
            self.compile_results = [result]
            return
    with th.dynamo_timed("CachingAutotuner.slow_precompile_config"):
        if self.fn.fn is None:
            self.fn = reload_kernel_from_src().fn
        self.compile_results = [self._precompile_config(best)]
