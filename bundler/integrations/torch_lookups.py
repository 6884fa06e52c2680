"""Which Inductor cache keys this process looked up: "installed but never looked up" (pytorch#144859).

A copied cache can be transferred, installed and still never used: the job computes other keys
(another model, other settings, a torch whose keys differ), so every lookup misses or never
reaches the installed entries, and nothing says so. While a :class:`LookupRecorder` runs, thin
wrappers around the running torch's lookup functions record every key looked up; the torch
session compares them with the entries its bundle installed (:func:`summary_phrase`).

What is wrapped (torch 2.13; other versions are checked by signature when wrapped, see below):

* FX graphs: ``FxGraphCache._lookup_graph(key, example_inputs, local, ...)``
  (``_inductor/codecache.py``). Every FX lookup, hit or miss, comes through it: Inductor's own
  (``FxGraphCache.load_with_key`` from ``compile_fx``) and the forward/backward graphs an
  AOTAutograd hit loads (``aot_autograd_result.py``, also through ``load_with_key``). Narrower than
  ``load_with_key`` (no logging, counters) and wider than nothing else that sees the key. On disk:
  ``inductor/fxgraph/<key[1:3]>/<key>/<entry>``.
* AOTAutograd: ``AOTAutogradCache._lookup(key, local, remote, ...)``
  (``_functorch/_aot_autograd/autograd_cache.py``), called by ``try_load`` (and
  ``standalone_compile``) for every lookup. On disk: ``inductor/aotautograd/<key>/<entry>``.
  Both are recorded only when ``local`` is true: an installed file is consulted only then.
* Autotune records: ``AutotuneCache._read(self)`` (``_inductor/runtime/autotune_cache.py``), whose
  ``self.local_cache[1]`` is the ``<dir>/<name>.best_config`` path; and ``AutotuneCache.__setstate__``,
  because with parallel compile Inductor creates and reads the ``AutotuneCache`` of a Triton kernel
  in a compile worker process and pickles it back to this one (``async_compile.triton``): its
  arrival here is the only trace of that lookup. Records are matched by their last two path parts
  (``<xx>/<name>.best_config``), which do not depend on the cache directory.

A function that is missing, or whose signature differs (another torch), is not wrapped, and its
layer is reported as unknown rather than guessed. Nothing here raises into the job: a wrapper that
cannot read the key records nothing and calls the original. The wrappers are shared by every
running recorder and removed when the last one stops (unless something else has wrapped the same
attribute since: then ours stays, inert, under it). Torch loggers are never touched.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from bundler.integrations.torch_hooks import Recorder, SharedHooks, parameters_if, replace

log = logging.getLogger(__name__)

__all__ = ["AOT", "AUTOTUNE", "FX", "LAYERS", "LookupRecorder", "installed_keys", "never_looked_up",
           "summary_phrase"]

FX, AOT, AUTOTUNE = "fx", "aot", "autotune"
LAYERS = (FX, AOT, AUTOTUNE)
_NOUNS = {FX: "FX graphs", AOT: "AOT entries", AUTOTUNE: "autotune records"}
_BEST_CONFIG = ".best_config"


# --- what a bundle installed ----------------------------------------------------------------------


def installed_keys(members: Iterable[str]) -> dict[str, set[str]]:
    """The cache keys held by a torch bundle's member names, per layer.

    ``inductor/fxgraph/<xx>/<key>/<entry>`` gives an FX key, ``inductor/aotautograd/<key>/<entry>``
    an AOTAutograd key, ``inductor/<xx>/<name>.best_config`` an autotune record ``<xx>/<name>.best_config``.
    """
    out: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for name in members:
        parts = name.split("/")
        if len(parts) < 3 or parts[0] != "inductor":
            continue
        if parts[1] == "fxgraph" and len(parts) == 5:
            out[FX].add(parts[3])
        elif parts[1] == "aotautograd" and len(parts) == 4:
            out[AOT].add(parts[2])
        elif parts[-1].endswith(_BEST_CONFIG):
            out[AUTOTUNE].add(_record_key(parts))
    return out


def _record_key(parts: list[str]) -> str:
    return "/".join(parts[-2:])


def never_looked_up(installed: dict[str, set[str]], seen: dict[str, set[str]] | None) -> dict[str, set[str] | None]:
    """Per layer, the installed keys not in ``seen`` (None: that layer's lookups are unknown)."""
    out: dict[str, set[str] | None] = {}
    for layer in LAYERS:
        keys = installed.get(layer, set())
        looked = None if seen is None else seen.get(layer)
        out[layer] = None if looked is None else keys - looked
    return out


def summary_phrase(members: Iterable[str], recorder: LookupRecorder | None) -> str:
    """``never looked up: 3 of 5 FX graphs, 0 of 2 AOT entries, unknown for 40 autotune records``
    (layers the bundle held nothing of are left out; empty when it held none). The keys themselves
    go to the DEBUG log."""
    installed = installed_keys(members)
    missing = never_looked_up(installed, recorder.seen() if recorder is not None else None)
    parts = []
    for layer in LAYERS:
        total = len(installed[layer])
        if not total:
            continue
        unused = missing[layer]
        if unused is None:
            parts.append(f"unknown for {total} {_NOUNS[layer]}")
            continue
        parts.append(f"{len(unused)} of {total} {_NOUNS[layer]}")
        if unused:
            log.debug("torch compile cache: %s installed but never looked up: %s",
                      _NOUNS[layer], ", ".join(sorted(unused)))
    return "never looked up: " + ", ".join(parts) if parts else ""


# --- the recorder ---------------------------------------------------------------------------------


class LookupRecorder(Recorder):
    """Records the cache keys this process looks up between :meth:`start` and :meth:`stop`.

    Thread-safe; never raises. ``seen()`` gives, per layer, the keys seen, or None for a layer
    whose lookup function this torch lacks (or that could not be wrapped).
    """

    what = "cache lookups"

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, set[str]] = {layer: set() for layer in LAYERS}

    def record(self, layer: str, key: str) -> None:
        with self._lock:
            self._seen[layer].add(key)

    def seen(self) -> dict[str, set[str] | None]:
        with self._lock:
            return {layer: set(self._seen[layer]) if layer in self.watched else None for layer in LAYERS}


# --- the wrappers ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    """One function to wrap: ``module.owner.attr``, the layer it serves, how to read its key."""

    layer: str
    module: str
    owner: str
    attr: str
    read: str  # "key": the argument named ``key`` (gated by ``local``); "self": self.local_cache[1] after
    params: tuple[str, ...]  # the leading parameters the signature must have


_TARGETS = (
    _Target(FX, "torch._inductor.codecache", "FxGraphCache", "_lookup_graph", "key",
            ("key", "example_inputs", "local")),
    _Target(AOT, "torch._functorch._aot_autograd.autograd_cache", "AOTAutogradCache", "_lookup", "key",
            ("key", "local", "remote")),
    _Target(AUTOTUNE, "torch._inductor.runtime.autotune_cache", "AutotuneCache", "_read", "self", ("self",)),
    _Target(AUTOTUNE, "torch._inductor.runtime.autotune_cache", "AutotuneCache", "__setstate__", "self",
            ("self", "state")),
)


def _install(deliver: Callable[[str, str], None]) -> tuple[Callable[[], None], frozenset[str]]:
    """Wrap every target this torch has: how to undo it, and the layers all of whose targets are wrapped."""
    undos: list[Callable[[], None]] = []
    failed: set[str] = set()
    for target in _TARGETS:
        undo = _wrap(target, deliver)
        if undo is None:
            failed.add(target.layer)
        else:
            undos.append(undo)
    layers = frozenset(target.layer for target in _TARGETS) - failed
    for layer in sorted(failed):
        log.debug("cache lookups of %s not recorded on this torch", _NOUNS[layer])
    return functools.partial(_undo_all, undos), layers


def _wrap(target: _Target, deliver: Callable[[str, str], None]) -> Callable[[], None] | None:
    """Wrap one target; its undo, or None where this torch lacks it or has another signature."""
    try:
        owner = getattr(importlib.import_module(target.module), target.owner)
        raw = owner.__dict__[target.attr]
    except Exception as exc:  # noqa: BLE001 - absent in this torch
        log.debug("no %s.%s.%s: %s", target.module, target.owner, target.attr, exc)
        return None
    kind = type(raw)
    func = raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw
    if not inspect.isfunction(func) or (kind is classmethod):
        return None
    where = f"{target.owner}.{target.attr}"
    names = parameters_if(func, target.params, where)
    if names is None:
        return None
    layer = target.layer
    if target.read == "key":
        key_at, local_at = names.index("key"), names.index("local")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                key = args[key_at] if len(args) > key_at else kwargs.get("key")
                local = args[local_at] if len(args) > local_at else kwargs.get("local", True)
                if local and isinstance(key, str):
                    deliver(layer, key)
            except Exception:  # noqa: BLE001, S110 - recording is a courtesy; the lookup must run
                pass
            return func(*args, **kwargs)
    else:

        @functools.wraps(func)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return func(self, *args, **kwargs)
            finally:
                _deliver_record(self, layer, deliver)

    return replace(owner, target.attr, raw, staticmethod(wrapper) if kind is staticmethod else wrapper, where)


def _deliver_record(cache: Any, layer: str, deliver: Callable[[str, str], None]) -> None:
    try:
        local = getattr(cache, "local_cache", None)
        if isinstance(local, tuple) and len(local) == 2 and isinstance(local[1], str):
            deliver(layer, _record_key(local[1].replace("\\", "/").split("/")))
    except Exception:  # noqa: BLE001, S110 - recording is a courtesy
        pass


def _undo_all(undos: list[Callable[[], None]]) -> None:
    for undo in reversed(undos):
        undo()


LookupRecorder.hooks = SharedHooks(_install, nothing=frozenset())
