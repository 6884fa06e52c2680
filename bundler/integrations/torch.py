"""torch.compile (Inductor) integration: a fresh node at another path compiles and builds nothing.

One line around a training or serving script::

    from bundler.integrations import torch as bt

    with bt.compile_cache("s3://bucket/caches", tag="llama-train"):   # or BUNDLER_REMOTE / BUNDLER_TAG
        model = torch.compile(model)
        train(model)

or ``session = bt.begin(...)`` ... ``bt.end(session)`` where a ``with`` block does not fit.

What happens, and why in that order (docs/torch.md has the measurements and torch citations):

1. ``begin`` makes the cache directories known: ``TORCHINDUCTOR_CACHE_DIR`` (set to Inductor's own
   default when unset, so nothing moves), ``TRITON_CACHE_DIR`` when the user set one (otherwise
   Triton's kernels live under the Inductor dir) and the precompiled-header dir, which Inductor
   keeps under its *default* dir even when ``TORCHINDUCTOR_CACHE_DIR`` points elsewhere.
2. It computes the compatibility facts (:func:`environment_facts`: torch version and
   ``torch_key``, Triton, Python, device, compute capability, CUDA/HIP, CPU vector ISA honouring
   ``ATEN_CPU_CAPABILITY``, machine, compiler, tag, and hashes of the key-bearing Inductor and
   functorch settings). Inductor's own keys leave the CPU ISA out, so a cache from an AVX512 node
   returns wrong numbers on an AVX2 node: the facts are what stops that.
3. The ref name is ``<prefix>/<hash of the facts>``: another environment simply has another ref.
   The ref's stored facts are compared with ours *before* the bundle is downloaded (a ref that
   does not match is refused with one line naming the fact); on a miss the nearest ref under the
   same prefix is named with the facts that differ (:func:`explain`).
4. The bundle unpacks into the cache directories before the first compile, through the ordinary
   ``transfer.pull`` (verified, atomic), with Triton group files and Inductor's pickled absolute
   paths relocated to this node's directories (:mod:`bundler.integrations.torch_relocate`). The
   precompiled headers (one ~150 MB file on a CPU job, nearly all the bytes) are a bundle of their
   own, named in the ref's ``bundles``: they are pulled after the first compile is released, and
   only Inductor's first header build waits for them (:mod:`bundler.integrations.torch_gate`).
5. ``end`` (after a miss, or a hit that still compiled something) packs the cache directories and
   pushes them with ``transfer.push``; after a complete hit it pushes nothing. In strict mode
   (``strict=True`` or ``BUNDLER_STRICT=1``) a session that should have been a warm start but
   compiled a graph, tuned a kernel or built C++ raises :class:`IncompleteWarmStart`. Either way
   one summary line is logged (``bundler.integrations.torch`` logger, INFO) and kept in
   :meth:`CompileCache.summary_line`.

The cache is never a dependency: a dead store, a missing, refused or corrupt bundle costs one
warning (or one INFO line for a plain miss) and the job compiles. Key-bearing settings
(``enable_remote_autograd_cache``, ``strict_autograd_cache``, the remote-cache switches, ...) are
never changed: flipping one changes every Inductor/AOTAutograd key.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bundler.config import Settings
from bundler.errors import BundlerError, ConfigError, NotFoundError

log = logging.getLogger(__name__)

__all__ = [
    "CompileCache", "IncompleteWarmStart", "begin", "cache_dirs", "compile_cache", "end",
    "environment_facts", "explain", "fact_differences", "ref_name",
]

#: Default ref prefix; ``compile_cache(ref="name")`` replaces it.
REF_PREFIX = "torch"
#: Layer names: the first path component of every member, and the ``dest`` mapping's keys.
INDUCTOR, TRITON, PCH = "inductor", "triton", "pch"
#: Facts that decide whether a bundle may be installed (all of them enter the ref name).
COMPAT_FACTS = (
    "torch", "torch_key", "triton", "python", "machine", "cpu_isa", "cpu_features", "device",
    "device_name", "capability", "cuda", "hip", "cxx", "inductor_config", "functorch_config",
    "tag", "torch_bundle_format",
)
#: Bumped when what a torch bundle holds (or where) changes incompatibly. The ``torch_bundle_format``
#: fact also carries the archive format written (:data:`bundler.bundle.manifest.FORMAT_VERSION`), so
#: a release that writes a newer archive uses other refs than the releases that cannot read it: in
#: a fleet part-way through an upgrade, old nodes never fetch (and refuse) the new bundles.
TORCH_BUNDLE_FORMAT = "2"  # 2: precompiled headers in a bundle of their own (the ref's ``bundles``)
#: Counters that mean "this process compiled or tuned": strict mode's evidence. Not
#: ``select_algorithm_autotune`` or ``benchmarking.*``: on an FX graph hit Inductor replays the
#: cached graph's compile-time counter deltas (``codecache.py:1991``), and on an H200 a complete warm
#: start from a bundle showed ``select_algorithm_autotune: 5`` and 105 benchmark calls it never
#: ran. Compile-time tuning without a replay shows up as an FX miss; runtime tuning as
#: ``coordesc_tuning_bench`` (never replayed) and as ``.best_config`` / ``.cubin`` files made anew.
_WORK_COUNTERS = (
    ("inductor", "fxgraph_cache_miss"),
    ("aot_autograd", "autograd_cache_miss"),
    ("inductor", "coordesc_tuning_bench"),
)
#: Files whose appearance during a warm start means work was redone (C++ builds, re-tuning, Triton).
_WORK_SUFFIXES = (".so", ".gch", ".best_config", ".cubin", ".hsaco")
#: Seconds a compile waits for the session's facts beyond the store's wait budget.
_FACTS_MARGIN_S = 30.0
#: Refs listed by explain() at most (each costs one GET).
_EXPLAIN_MAX_REFS = 50
#: The header bundle is one compiled binary with no far repeats: level 1 without long-distance
#: matching costs ~4% more bytes than the default and about half the CPU on a 154 MB ``.gch``.
_HEADER_BUNDLE_LEVEL = 1
#: Producer facts that travel in the manifest itself (kept by an offline import, unlike ``extra``):
#: the producer's directory per layer (the header bundle's digest is ``refs.LINKED_FACT``).
_DIR_FACT = "dir."


class IncompleteWarmStart(BundlerError):
    """Strict mode: a session that should have been a warm start compiled, tuned or built."""

    exit_code = 3


# --- where the caches live ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheDirs:
    """The local directories a torch bundle spans, keyed by layer name (``None``: not separate)."""

    inductor: Path
    triton: Path | None
    pch: Path | None

    def layers(self) -> dict[str, Path]:
        found = {INDUCTOR: self.inductor, TRITON: self.triton, PCH: self.pch}
        return {name: path for name, path in found.items() if path is not None}


def cache_dirs() -> CacheDirs:
    """The Inductor, Triton and precompiled-header directories this process will use.

    ``TORCHINDUCTOR_CACHE_DIR`` is set to Inductor's own default when unset (Inductor sets it the
    same way on first use), so every later reader agrees on one place. ``TRITON_CACHE_DIR`` is
    left alone: unset, Inductor puts Triton's kernels under ``<inductor>/triton/<device>``, which
    the Inductor layer already covers. The precompiled headers live under Inductor's *default*
    dir whatever ``TORCHINDUCTOR_CACHE_DIR`` says (``codecache._HEADER_DIR``); they are always
    their own layer (``pch/``), also when that folder lies inside the Inductor dir, so a bundle
    lands right whichever way producer and consumer set ``TORCHINDUCTOR_CACHE_DIR``.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    inductor = Path(os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    triton_env = os.environ.get("TRITON_CACHE_DIR")
    triton = Path(os.path.abspath(triton_env)) if triton_env else None
    pch = Path(os.path.abspath(os.path.join(default_cache_dir(), "precompiled_headers")))
    return CacheDirs(
        inductor=inductor,
        triton=None if triton is None or _inside(triton, inductor) else triton,
        pch=pch if _precompiled_headers_on() else None,
    )


def _precompiled_headers_on() -> bool:
    from torch._inductor import config

    return bool(getattr(config, "cpp_cache_precompile_headers", False)) and sys.platform != "win32"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# --- compatibility facts --------------------------------------------------------------------------


def environment_facts(tag: str | None = None) -> dict[str, str]:
    """Everything that decides whether another machine's torch compile cache is safe and useful here.

    All values are strings (they travel in the manifest's producer facts and the ref). Computing
    them builds nothing: the CPU ISA is predicted from the CPU's features the way
    ``cpu_vec_isa.pick_vec_isa`` picks it, without its trial compiles. The settings-derived facts
    are read on the calling thread: torch 2.13 keeps setting overrides per thread.
    """
    return _environment_facts(tag, _JobSettings.read())


@dataclasses.dataclass(frozen=True)
class _JobSettings:
    """The facts that come from Inductor/functorch settings, read on the job's own thread.

    torch 2.13 keeps a user's setting overrides per thread (``utils/_config_module.py``: each
    setting is a ``ContextVar``, and a new thread starts from the defaults), so a fetch thread
    reading them would see a default job's settings and give a ``max_autotune`` job the default
    job's ref. :meth:`CompileCache.begin` reads these on the job's thread (milliseconds) and hands
    them to the fetch; the fetch thread also runs in a copy of the job thread's context, so any
    other setting torch reads there (``cpp.cxx`` for the compiler fact) is the job's too.
    """

    facts: dict[str, str]  # cpu_isa, inductor_config, functorch_config
    inductor: dict[str, str]  # the settings behind the hash, for the ref's extra and explain
    functorch: dict[str, str]

    @classmethod
    def read(cls) -> _JobSettings:
        inductor = _config_dict("torch._inductor.config")
        functorch = _config_dict("torch._functorch.config")
        facts = {"cpu_isa": _cpu_vec_isa(), "inductor_config": _settings_hash(inductor),
                 "functorch_config": _settings_hash(functorch)}
        return cls(facts, inductor, functorch)


def _environment_facts(tag: str | None, job: _JobSettings) -> dict[str, str]:
    import torch
    from torch._inductor.codecache import torch_key

    from bundler.bundle.manifest import FORMAT_VERSION  # here, not at import: jobs import this module

    facts = {
        "torch": torch.__version__,
        "torch_key": torch_key().hex(),
        "triton": _triton_version(),
        "python": "{}.{}".format(*sys.version_info[:2]),
        "machine": platform.machine(),
        "cpu_features": ",".join(_cpu_features()) or "none",
        "cxx": _compiler_version(),
        "tag": tag or "",
        "torch_bundle_format": f"{TORCH_BUNDLE_FORMAT}.{FORMAT_VERSION}",
        # informational: shown by explain, not compared (see docs/torch.md)
        "cpu_model": _cpu_model(),
        "torch_dir": os.path.dirname(torch.__file__),
        **job.facts,
    }
    facts.update(_device_facts())
    return facts


def ref_name(facts: Mapping[str, str], prefix: str = REF_PREFIX) -> str:
    """``<prefix>/<hash of the compatibility facts>``: one ref per compatible environment."""
    wanted = {name: facts.get(name, "") for name in COMPAT_FACTS}
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:32]
    return f"{prefix.rstrip('/')}/{digest}"


def fact_differences(ours: Mapping[str, str], theirs: Mapping[str, Any]) -> list[str]:
    """One phrase per compatibility fact that differs: ``cpu_isa avx2 here, avx512 in the bundle``."""
    out = []
    for name in COMPAT_FACTS:
        here, there = ours.get(name, ""), str(theirs.get(name, ""))
        if here != there:
            out.append(f"{name} {_short(here)!s} here, {_short(there)!s} in the bundle")
    return out


def _short(value: str) -> str:
    if value == "":
        return "''"
    return value if len(value) <= 24 else value[:12] + "..."


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - absent or broken: either way not usable by Inductor
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


def _cpu_features() -> list[str]:
    try:
        from torch._inductor.cpu_vec_isa import x86_isa_checker

        return sorted(x86_isa_checker())
    except Exception as exc:  # noqa: BLE001 - a private helper; never fail a job over it
        log.debug("no CPU feature list (%s)", exc)
        return []


def _cpu_vec_isa() -> str:
    """``str(pick_vec_isa())`` without the trial compiles ``pick_vec_isa`` runs on a cold cache.

    Same rules as torch 2.13's ``cpu_vec_isa.pick_vec_isa`` / ``valid_vec_isa_list``: candidate
    ISAs whose flags the CPU reports, then ``config.cpp.simdlen`` or ``ATEN_CPU_CAPABILITY``.
    Where a trial compile would fail (a compiler too old for AVX512) the real pick is lower:
    :meth:`CompileCache.end` checks that before it pushes.
    """
    try:
        from torch._inductor import config
        from torch._inductor import cpu_vec_isa as isa

        if platform.machine() in ("x86_64", "AMD64") and sys.platform in ("linux", "win32"):
            flags = set(isa.x86_isa_checker())
            candidates = [v for v in isa.supported_vec_isa_list if all(f in flags for f in str(v).split())]
        else:
            candidates = isa.valid_vec_isa_list()  # no trial builds off x86
        if config.is_fbcode() and platform.machine() in ("x86_64", "AMD64"):
            return "avx2"
        if not candidates:
            return str(isa.invalid_vec_isa) or "none"
        if config.cpp.simdlen is None:
            picked = isa.get_isa_from_cpu_capability(
                os.getenv("ATEN_CPU_CAPABILITY"), candidates, isa.invalid_vec_isa
            )
        else:
            picked = next((v for v in candidates if v.bit_width() == config.cpp.simdlen), isa.invalid_vec_isa)
        return str(picked) or "none"
    except Exception as exc:  # noqa: BLE001
        log.debug("could not predict the CPU vector ISA (%s)", exc)
        return "unknown"


def _picked_vec_isa(*, trial_builds: bool = False) -> str | None:
    """Inductor's real pick of the CPU vector ISA, checked before a push; None when this process
    has not made it and ``trial_builds`` is off.

    Making the pick runs a trial C++ build per candidate ISA (4.6 s for one on this project's
    2-core CI machine; the end of a GPU-only max-autotune job on an H200 took 44 s, mostly this).
    A process that generated no CPU code never made the pick, and nothing it adds to the cache
    depends on the ISA, so there is nothing to check.
    """
    try:
        from torch._inductor import cpu_vec_isa

        if not trial_builds and not cpu_vec_isa.valid_vec_isa_list.cache_info().currsize:
            return None
        return str(cpu_vec_isa.pick_vec_isa()) or "none"
    except Exception:  # noqa: BLE001
        return "unknown"


def _compiler_version() -> str:
    """The C++ compiler Inductor would use (``config.cpp.cxx``, read on the calling thread) and its
    version (one subprocess per compiler, cached)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return _compiler_version_of(get_cpp_compiler())
    except Exception as exc:  # noqa: BLE001 - no compiler: Inductor's CPU backend will say so itself
        log.debug("no C++ compiler version (%s)", exc)
        return "none"


@functools.cache
def _compiler_version_of(compiler: str) -> str:
    try:
        from torch._inductor.cpp_builder import get_compiler_version_info

        info = get_compiler_version_info(compiler)
        first = info.strip().splitlines()[0] if info.strip() else ""
        return f"{os.path.basename(compiler)} {first}".strip()
    except Exception as exc:  # noqa: BLE001
        log.debug("no C++ compiler version (%s)", exc)
        return "none"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _device_facts() -> dict[str, str]:
    import torch

    facts = {"device": "cpu", "device_name": "", "capability": "", "cuda": "", "hip": ""}
    try:
        if not torch.cuda.is_available():
            return facts
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        if torch.version.hip is not None:
            facts.update(device="hip", device_name=str(getattr(props, "gcnArchName", props.name)),
                         hip=str(torch.version.hip))
        else:
            facts.update(device="cuda", device_name=props.name, cuda=str(torch.version.cuda))
        facts["capability"] = f"{props.major}.{props.minor}"
    except Exception as exc:  # noqa: BLE001 - a broken driver: compile for CPU facts only
        log.debug("no GPU facts (%s)", exc)
    return facts


def _config_dict(module_name: str) -> dict[str, str]:
    """The key-bearing settings of an Inductor/functorch config module, as strings.

    ``save_config_portable`` is what Inductor hashes into its FX graph key (codecache
    ``FxGraphHashDetails``): every setting but private ones and the ignored prefixes.
    """
    import importlib

    module = importlib.import_module(module_name)
    try:
        portable = module.save_config_portable()
    except Exception as exc:  # noqa: BLE001 - e.g. a custom pass without uuid(): Inductor bypasses too
        log.debug("could not read %s settings (%s)", module_name, exc)
        return {"<unreadable>": type(exc).__name__}
    return {name: repr(value) for name, value in sorted(portable.items())}


def _config_hash(module_name: str) -> str:
    return _settings_hash(_config_dict(module_name))


def _settings_hash(settings: Mapping[str, str]) -> str:
    data = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _settings_differences(ours: Mapping[str, str], theirs: Mapping[str, Any], what: str) -> list[str]:
    names = sorted(set(ours) | set(theirs))
    out = []
    for name in names:
        if ours.get(name) != theirs.get(name):
            out.append(f"{what}.{name} {ours.get(name, 'unset')} here, {theirs.get(name, 'unset')} in the bundle")
    return out


# --- the session ----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Snapshot:
    files: dict[str, tuple[int, int]]  # member name -> (size, mtime_ns)

    def changed_since(self, earlier: _Snapshot) -> list[str]:
        return sorted(name for name, stat in self.files.items() if earlier.files.get(name) != stat)


class _Outcome:
    """A session attribute that is known once :meth:`CompileCache.begin`'s background work is:
    reading it waits for that work; the work itself writes the private field behind it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = "_" + name

    #: Known only once all of it is done (the header pull, the miss explanation), not just the part
    #: the first compile waits for.
    late = False

    def __get__(self, session: Any, owner: type | None = None) -> Any:
        if session is None:
            return self
        session.wait(everything=self.late)
        return getattr(session, self.field)

    def __set__(self, session: Any, value: Any) -> None:
        setattr(session, self.field, value)


class _LateOutcome(_Outcome):
    late = True


class CompileCache:
    """One job's torch compile cache session: fetched at :meth:`begin`, pushed at :meth:`end`.

    ``status`` after begin: ``hit`` (bundle installed), ``miss`` (no bundle for these facts),
    ``refused`` (a ref whose facts differ), ``error`` (store or bundle failure: one warning) or
    ``off`` (no remote configured).
    """

    status = _Outcome()
    ref = _Outcome()
    facts = _Outcome()
    reason = _Outcome()
    explanation = _LateOutcome()
    pulled_bytes = _LateOutcome()  # the header bundle adds to them after the first compile is released
    pulled_files = _LateOutcome()

    def __init__(
        self,
        remote: str | None = None,
        *,
        ref: str | None = None,
        tag: str | None = None,
        strict: bool | None = None,
        push: bool = True,
        background: bool = True,
        settings: Settings | None = None,
        store: Any = None,
    ) -> None:
        self.settings = settings
        self._remote = remote
        self._ref_arg = ref
        self._prefix = ref or REF_PREFIX
        self._tag = tag
        self._strict = strict
        self._push = push
        self._store = store
        self._reader: Any = None  # the helper process serving the fetch's reads, if any
        self._background = background
        self._worker: threading.Thread | None = None
        self._pid = os.getpid()
        self._done = threading.Event()
        self._headers_done = threading.Event()  # the precompiled-header bundle is in place (or given up)
        self._finished = threading.Event()  # all background work, the miss explanation included
        self._explain_store: Any = None  # set on a miss: the nearest ref is looked up after the compile is released
        self._headers_gated = False  # only Inductor's header build waits for it (else the first compile does)
        self._headers: dict[str, Any] | None = None  # the installed ref's header bundle: digest, size, files
        self._headers_installed: list[str] = []
        # Headers pushed while the job went on (after a compile that built them): the entry the
        # ref will name and the folder's state it was packed from, and the thread doing it.
        self._early_headers: tuple[dict[str, Any], dict[str, tuple[int, int]]] | None = None
        self._early_thread: threading.Thread | None = None
        self._after_compile = self._push_headers_early  # one bound method, so the gate can forget it
        self._status = "off"
        self._ref: str | None = None
        self._facts: dict[str, str] = {}
        self.dirs: CacheDirs | None = None
        self._pulled_bytes = 0
        self._pulled_files = 0
        self.pushed_bytes = 0
        self.pushed_digest: str | None = None
        self._reason = ""
        self._explanation = ""
        self._producer_compile_s: float | None = None
        self._before: dict[str, _Snapshot] = {}
        self._counters_before: dict[tuple[str, str], int] = {}
        self._compile_s_before = 0.0
        self._started = 0.0
        self._summary = ""
        self._begun = self._ended = False
        self._lock = threading.Lock()  # begin/end once each, also when two threads race to end
        self._job_settings = _JobSettings({}, {}, {})  # read on the job's thread by begin()
        self._headers_watched = False  # torch_gate records the headers Inductor writes (else: a snapshot diff)
        self._prepare_s: float | None = None
        self._held_s = 0.0
        self._headers_held_s = 0.0
        self._lookups: Any = None  # torch_lookups.LookupRecorder while a bundle may be installed
        self._installed_members: list[str] = []
        #: sha256 of every installed file as this session left it (the manifest's, or the
        #: relocated bytes'): a file another rank rewrote with the same bytes is not "added".
        self._installed_sha256: dict[str, str] = {}
        self._fx_details: Any = None  # torch_missdiff.DetailsRecorder: components of the FX keys computed here
        self._bundle_fx: Any = None  # torch_missdiff.Bundled: those of the installed bundle's graphs
        self._fx_miss_phrase = ""
        #: Seconds per step of the fetch (facts, ref, pull, relocate, snapshot, headers): where a
        #: first compile's wait goes. Filled by the fetch thread; complete once it is done.
        self.timings: dict[str, float] = {}

    # -- begin ---------------------------------------------------------------------------------

    def begin(self) -> CompileCache:
        """Make the caches known and start installing this environment's bundle; never raises for
        the cache. The facts, ref lookup, download and unpack run on a background thread (unless
        ``background=False``), so they overlap the job's own start-up; Inductor's first compile
        waits for them (:mod:`bundler.integrations.torch_gate`), and so does reading ``status`` or
        any other outcome attribute. A session is used once: begin it again after its end and it
        warns and does nothing (make a new one with :func:`compile_cache`)."""
        with self._lock:
            if self._begun:
                if self._ended:
                    log.warning("torch compile cache: this session already ended; a CompileCache is used once, "
                                "so this block runs without it (make a new one with compile_cache(...))")
                return self
            self._begun = True
        self._started = time.monotonic()
        try:
            self._resolve_settings()
            self.dirs = cache_dirs()  # before anything imports Inductor's caches: they read the env
            # On the job's thread: torch 2.13 keeps setting overrides per thread (_JobSettings).
            self._job_settings = _JobSettings.read()
        except ConfigError as exc:
            log.warning("torch compile cache off: %s", exc)
            self._status, self._reason = "off", str(exc)
            return self
        except Exception as exc:  # noqa: BLE001 - private torch APIs; never fail the job
            log.warning("torch compile cache off: could not read the environment (%s: %s)", type(exc).__name__, exc)
            self._status, self._reason = "off", str(exc)
            return self
        try:
            self._start()
        except BaseException as exc:
            # Whatever failed (a private torch API, a store constructor, a thread limit), the job
            # goes on with no cache: everything installed so far comes out again.
            self._undo_begin()
            if not isinstance(exc, Exception):
                raise  # Ctrl-C during begin is the job's, not the cache's
            log.warning("torch compile cache off: the session could not start (%s: %s); compiling without it",
                        type(exc).__name__, exc)
            log.debug("session start failure", exc_info=exc)
            self._status, self._reason = "error", f"{type(exc).__name__}: {exc}"
        return self

    def _start(self) -> None:
        """:meth:`begin` past the settings: the recorders, the gates and the fetch (or, with
        ``background=False``, the fetch itself). Anything it raises is undone by :meth:`_undo_begin`."""
        from bundler.integrations import torch_gate

        assert self.settings is not None and self.dirs is not None
        if self.settings.torch_backports:
            from bundler.integrations import torch_backports

            torch_backports.install()  # a fix of torch's own, independent of the session: it stays
        if self.settings.remote:
            from bundler.integrations import torch_lookups

            self._lookups = torch_lookups.LookupRecorder().start()  # keys looked up, for the summary
            from bundler.integrations import torch_missdiff

            self._fx_details = torch_missdiff.DetailsRecorder().start()  # why an FX graph missed
        self._counters_before = _work_counters()
        self._compile_s_before = _inductor_compile_s()
        if self.dirs.pch is not None:
            # Which headers this job's compiles use: only those are its header layer.
            self._headers_watched = torch_gate.watch_headers()
        if self.settings.remote and self._push and self.dirs.pch is not None:
            try:
                torch_gate.after_next_compile(self._after_compile)
            except Exception as exc:  # noqa: BLE001 - private torch API: the headers are then pushed at end()
                log.debug("torch compile cache: no early header push (%s: %s)", type(exc).__name__, exc)
        if not self._background:
            self._prepare()
            self._pull_headers()
            self._explain()
            self._done.set()
            self._headers_done.set()
            self._finished.set()
            return
        self._start_reader()
        # The gate first: it imports compile_fx (and with it what a compile loads) on the job's
        # thread, so the fetch thread never imports torch internals while the job does. Two
        # threads importing one package with circular imports can hand one of them a partly
        # initialised module (CPython accepts that to break the deadlock), and that must never be
        # the job's thread.
        torch_gate.hold_until(self._done, self._wait_limit_s(), "the bundle")
        if self.dirs.pch is not None:
            self._headers_gated = torch_gate.hold_headers_until(
                self._headers_done, self._wait_limit_s(), "the precompiled headers")
        # In a copy of the job thread's context: torch 2.13's setting overrides are context
        # variables, and a new thread would otherwise see only the defaults.
        context = contextvars.copy_context()
        worker = threading.Thread(target=context.run, args=(self._prepare_in_background,),
                                  name="bundler-torch-fetch", daemon=True)
        self._pid = os.getpid()
        try:
            worker.start()
        except RuntimeError as exc:  # "can't start new thread": no fetch, and nothing may wait for one
            raise RuntimeError(f"could not start the fetch thread ({exc})") from exc
        self._worker = worker

    def _undo_begin(self) -> None:
        """Take out what :meth:`_start` installed (recorders, callbacks, gates, the helper process)
        and mark the fetch done, so nothing waits for it; never raises."""
        from bundler.integrations import torch_gate

        for recorder in (self._lookups, self._fx_details):
            if recorder is not None:
                recorder.stop()
        self._lookups = self._fx_details = None
        steps = [functools.partial(torch_gate.forget_callback, self._after_compile), self._close_reader]
        for event in (self._done, self._headers_done, self._finished):
            steps += [event.set, functools.partial(torch_gate.release, event)]
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001
                log.debug("torch compile cache: undoing begin: %s: %s", type(exc).__name__, exc)
        self._worker = None
        self.dirs = None  # end() then has nothing to push, check or summarise

    def wait(self, timeout: float | None = None, *, everything: bool = False) -> CompileCache:
        """Block until :meth:`begin`'s background work is done (``timeout``: default the pull budget
        plus a margin); outcome attributes (``status``, ``ref``, ``facts``, ...) do this for you.

        By default only until the bundle is in place, as the first compile waits; ``everything``:
        also the precompiled headers and a miss's explanation, which come after.
        """
        if self._worker is None or threading.current_thread() is self._worker:
            return self
        if os.getpid() != self._pid:  # a forked child: the fetch thread stayed in the parent
            return self
        limit = time.monotonic() + (self._wait_limit_s() if timeout is None else timeout)
        self._done.wait(max(0.0, limit - time.monotonic()))
        if everything:
            self._finished.wait(max(0.0, limit - time.monotonic()))
        return self

    def _wait_limit_s(self) -> float:
        """The store's wait budget plus room for the facts (``torch_key`` hashes torch's sources)."""
        budget = self.settings.pull_budget if self.settings is not None else 60.0
        return budget + _FACTS_MARGIN_S

    def _prepare_in_background(self) -> None:
        started = time.monotonic()
        try:
            self._prepare()
            if not self._headers_gated:
                self._pull_headers()
        except Exception as exc:  # noqa: BLE001 - a background failure must never reach the job
            log.warning("torch compile cache off: %s: %s", type(exc).__name__, exc)
            self._status, self._reason = "error", str(exc)
        finally:
            self._prepare_s = time.monotonic() - started
            self._done.set()
        try:
            if self._headers_gated:
                self._pull_headers()
        except Exception as exc:  # noqa: BLE001 - the session still hit; Inductor builds its headers
            log.warning("torch compile cache: precompiled headers not installed: %s: %s", type(exc).__name__, exc)
        finally:
            self._headers_done.set()
        try:
            self._explain()
        finally:
            self._finished.set()
        # Every read is done: the helper process goes now, not hours later with the session.
        read_through_helper = self._reader is not None
        self._close_reader()
        if read_through_helper:
            self._connect_for_push()

    def _connect_for_push(self) -> None:
        """After a miss read through the helper process, import botocore here now, while the job
        compiles (Inductor waits on compile workers and benchmarks much of that time), rather than
        at the end, which the job waits for: pushes run in this process."""
        if not self._push or self._status == "hit" or self._ended:
            return
        try:
            self._open_store().connect()
        except Exception as exc:  # noqa: BLE001 - the push at the end reports a store it cannot use
            log.debug("torch compile cache: store not prepared for the push (%s: %s)", type(exc).__name__, exc)

    def _prepare(self) -> None:
        """The facts, the ref, the fetch (when a remote is configured) and the snapshot of the cache
        folders that :meth:`end` compares with. Reads and writes only the private fields behind the
        outcome attributes: those wait for this very work."""
        try:
            with self._timed("facts"):
                self._facts = _environment_facts(self._tag if self._tag is not None else self.settings.tag,
                                                 self._job_settings)
            self._ref = ref_name(self._facts, self._prefix)
        except Exception as exc:  # noqa: BLE001 - facts from private torch APIs; never fail the job
            log.warning("torch compile cache off: could not read the environment (%s: %s)", type(exc).__name__, exc)
            self._status, self._reason = "off", str(exc)
            return
        if self.settings.remote:
            self._fetch()
        else:
            self._reason = "no remote configured (BUNDLER_REMOTE)"
        with self._timed("snapshot"):
            self._before = self._snapshot()

    def _resolve_settings(self) -> None:
        if self.settings is None:
            self.settings = Settings.from_env()
        if self._remote is not None:
            self.settings = self.settings.replace(remote=self._remote)
        if self._ref_arg is None and self.settings.ref:
            # BUNDLER_REF (e.g. the ref `bundler warm` bakes in CI) names the job; the facts hash
            # is still appended, so another environment never installs this one's caches.
            self._prefix = self.settings.ref
        if self._strict is None:
            self._strict = _strict_from_env(self.settings)

    def _node_state(self) -> Path | None:
        """The per-host folder where pulls record what is unpacked (:func:`transfer.pull`)."""
        cache_dir = self.settings.cache_dir if self.settings is not None else None
        return Path(cache_dir) / "pulled" if cache_dir is not None else None

    def _open_store(self) -> Any:
        if self._store is None:
            from bundler.remote.health import shared_store

            self._store = shared_store(self.settings)
        return self._store

    def _start_reader(self) -> None:
        """Start the helper process that serves this session's reads (:mod:`bundler.stores.proxy`),
        first thing, so it imports botocore while this process imports Inductor."""
        from bundler.stores import proxy

        if self._store is None and proxy.wanted(self.settings):  # type: ignore[arg-type]
            self._reader = proxy.ProxyStore(self.settings)  # type: ignore[arg-type]

    def _open_read_store(self) -> Any:
        """Where the fetch reads: the helper process when there is one, else the store here."""
        return self._reader if self._reader is not None else self._open_store()

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _fetch(self) -> None:
        """Preflight the ref's facts, then pull, under the store failure policy and wait budget."""
        from bundler.remote import health

        self._status, self._reason = "error", "store or bundle unusable (see the warning above)"
        health.guarded(self.settings, "read", self._ref or "", self._fetch_request)

    def _fetch_request(self) -> None:
        """Runs in ``health.guarded``'s worker: anything it raises is one warning and a compile."""
        from bundler.remote.refs import read_ref

        store = self._open_read_store()
        try:
            with self._timed("ref"):
                found = read_ref(store, self._ref, self.settings)
        except NotFoundError:
            # Nothing to install: the first compile may go. Naming the nearest ref lists the
            # prefix and reads up to _EXPLAIN_MAX_REFS refs; that happens after (_explain).
            self._status, self._reason = "miss", ""
            self._explain_store = store
            return
        differing = fact_differences(self._facts, found.producer)
        if differing:
            self._status = "refused"
            self._reason = f"refused bundle {found.name}: {differing[0]}"
            log.warning("torch compile cache %s; compiling", self._reason)
            return
        self._install(store, found)

    def _install(self, store: Any, found: Any) -> None:
        from bundler.integrations.torch_relocate import UnpackRewriter, relocate_entries
        from bundler.remote import transfer

        assert self.dirs is not None
        layers = self.dirs.layers()
        producer_dirs = _producer_dirs(found)
        missing = [name for name in producer_dirs if name not in layers]
        for name in missing:  # the producer had TRITON_CACHE_DIR set, we do not: Inductor's device-0 dir
            if name == TRITON:
                layers[name] = self.dirs.inductor / "triton" / "0"
        rewriter = UnpackRewriter(producer_dirs, {name: str(path) for name, path in layers.items()})
        with self._timed("pull"):
            # One process per machine downloads; the other ranks sharing the directories find
            # the bundle unpacked (transfer.pull's node lock, as compile sessions use it).
            result = transfer.pull(store, layers, digest=found.digest, settings=self.settings, rewrite=rewriter,
                                   node_state=self._node_state())
        members = [record.path for record in result.manifest.files]
        self._installed_members = members
        from bundler.integrations import torch_missdiff

        self._bundle_fx = torch_missdiff.read_details(found.extra.get("fx_key_details"))
        relocated: dict[str, str] = {}
        with self._timed("relocate"):
            moved = relocate_entries(layers[INDUCTOR], members, rewriter.moves, written=relocated)
        self._installed_sha256 = {record.path: record.sha256 for record in result.manifest.files}
        self._installed_sha256.update(relocated)
        for name in members:  # group files hold this node's directories: as written here
            if rewriter.wants(name):
                digest = _file_sha256(layers, name)
                if digest is not None:
                    self._installed_sha256[name] = digest
        if moved:
            log.info("torch compile cache: pointed %d cache entries at this node's directories", moved)
        self._headers = _header_bundle(found)
        self._status = "hit"
        self._pulled_bytes = found.size
        self._pulled_files = len(result.manifest.files)
        compile_s = found.extra.get("inductor_compile_s")
        self._producer_compile_s = float(compile_s) if isinstance(compile_s, int | float) else None
        log.info("torch compile cache hit: %s (%d files, %d bytes)", found.name, self._pulled_files, found.size)

    @contextlib.contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[step] = round(time.monotonic() - started, 3)
            log.debug("torch compile cache: %s took %.3f s", step, self.timings[step])

    def _pull_headers(self) -> None:
        """The installed ref's precompiled-header bundle, into the header folder; then the snapshot
        of that folder counts the pulled files as the session's starting point (not as builds)."""
        entry, dirs = self._headers, self.dirs
        if entry is None or dirs is None or dirs.pch is None or self.settings is None:
            return
        from bundler.remote import health

        # Charged to the job's store budget only where the job waits for it: not when only a header
        # build may wait (then it runs inline, under a deadline of the budget left, and cannot
        # outlive this call).
        with self._timed("headers"):
            health.guarded(self.settings, "read", entry["digest"], functools.partial(self._pull_headers_request, entry),
                           wait=not self._headers_gated)
        if not self._headers_installed and not self._ended:  # (a failed job's end stops the pull: no news)
            log.warning("torch compile cache: precompiled headers %s not installed; Inductor builds them",
                        entry["digest"][:12])

    def _pull_headers_request(self, entry: Mapping[str, Any]) -> None:
        from bundler.remote import transfer

        assert self.dirs is not None and self.dirs.pch is not None
        result = transfer.pull(self._open_read_store(), {PCH: self.dirs.pch}, digest=entry["digest"],
                               settings=self.settings, node_state=self._node_state())
        installed = [record.path for record in result.manifest.files]
        self._installed_sha256.update({record.path: record.sha256 for record in result.manifest.files})
        before = self._before.setdefault(PCH, _Snapshot({}))  # pulled files are the start, not builds
        for member in installed:
            with contextlib.suppress(OSError):
                st = os.stat(self.dirs.pch / member[len(PCH) + 1:], follow_symlinks=False)
                before.files[member] = (st.st_size, st.st_mtime_ns)
        self._headers_installed = installed
        self._pulled_bytes += int(entry.get("size", 0))
        self._pulled_files += len(result.manifest.files)

    def _explain(self) -> None:
        """After a miss, once the first compile is free to go: the nearest ref and what differs."""
        store, self._explain_store = self._explain_store, None
        if store is None or self.settings is None:
            return
        from bundler.remote import health

        with self._timed("explain"):
            explained = health.guarded(self.settings, "read", self._ref or "", functools.partial(
                self._explain_miss, store), wait=not self._background)  # the job does not wait for it
        self._explanation = explained or "no bundle for this environment"
        log.info("torch compile cache miss for %s: %s", self._ref, self._explanation)

    def _explain_miss(self, store: Any) -> str:
        try:
            return _nearest(store, self._prefix, self._facts, self.settings, self._job_settings.inductor)
        except Exception as exc:  # noqa: BLE001 - explaining is a courtesy
            return f"no bundle for this environment (could not list others: {exc})"

    # -- end -----------------------------------------------------------------------------------

    def end(self, failed: bool = False) -> None:
        """Push what the compile produced (unless this was a complete hit), check strict mode, log
        the summary. ``failed``: the job raised; nothing is pushed and strict mode stays quiet.

        Waits for the background work only as far as something will use it: all of it before a
        push or a strict check; only the bundle's outcome (normally long known) for the summary of
        a session that pushes nothing; nothing at all after a failure, so a failing job's own
        error is not held up by a listing it will never read. Once per session, also when two
        threads end it at once."""
        with self._lock:
            if not self._begun or self._ended:
                return
            self._ended = True
        if self._lookups is not None:
            self._lookups.stop()
        if self._fx_details is not None:
            self._fx_details.stop()
        from bundler.integrations import torch_gate

        torch_gate.forget_callback(self._after_compile)
        pushing = not failed and self.settings is not None and bool(self.settings.remote) and self._push
        if self._worker is not None:
            self._held_s = torch_gate.held_s(self._done)
            self._headers_held_s = torch_gate.held_s(self._headers_done)
            torch_gate.release(self._done)
            torch_gate.release(self._headers_done)
            everything = not failed and (pushing or bool(self._strict))
            if not failed:
                self.wait(everything=everything)  # one bound (the store's budget plus a margin) for all of it
            if everything or self._finished.is_set():
                self._close_reader()  # every read is done (or given up: that stops it)
            # Otherwise the fetch thread closes it once its reads are done: closing it under a read
            # would send that read to the store in this process (botocore's import, a client).
            if not self._done.is_set():
                if not failed:
                    log.warning("torch compile cache: the bundle fetch is still running at the end of the "
                                "session; not pushing")
                return
            if pushing and not self._finished.is_set():
                log.warning("torch compile cache: the bundle fetch is still running at the end of the session; "
                            "not pushing")
                return
        if self.dirs is None:
            return
        if self._early_thread is not None and pushing:
            self._early_thread.join(self._wait_limit_s())
        work = self._work_done()
        added = self._added_files()
        if pushing:
            self._maybe_push(added)
        if self._status == "hit" and work.get("inductor.fxgraph_cache_miss"):
            from bundler.integrations import torch_missdiff

            self._fx_miss_phrase = torch_missdiff.explain_session(
                self._fx_details, self._before.get(INDUCTOR, _Snapshot({})).files, self._bundle_fx)
        self._summary = self._make_summary(work, added)
        log.info("%s", self._summary)
        if self._strict and not failed:
            self._check_strict(work, added)

    def _work_done(self) -> dict[str, int]:
        after = _work_counters()
        work = {f"{group}.{name}": after.get((group, name), 0) - self._counters_before.get((group, name), 0)
                for group, name in after}
        return {name: count for name, count in work.items() if count > 0}

    def _added_files(self) -> dict[str, list[str]]:
        """Files made or changed during the session, per layer: the header layer only for this
        session's headers (:meth:`_session_headers`), and not the installed files that another
        process (a rank sharing the directories) wrote again with the same bytes."""
        if not self._before:
            return {}
        now = self._snapshot()
        added = {layer: now[layer].changed_since(self._before.get(layer, _Snapshot({}))) for layer in now}
        if self._installed_sha256 and self.dirs is not None:
            layers = self.dirs.layers()
            for layer, names in added.items():
                added[layer] = [name for name in names if name not in self._installed_sha256
                                or _file_sha256(layers, name) != self._installed_sha256[name]]
        if PCH in added:
            ours = self._session_headers(added[PCH])
            added[PCH] = [name for name in added[PCH] if name in ours]
        return added

    def _session_headers(self, changed: list[str] | None = None) -> set[str]:
        """The header layer's member names that belong to this session: those its bundle installed,
        and those this process's compiles wrote or used (each ``.h`` with its ``.gch``). The header
        folder is Inductor's default one, shared by every job of the user on the host, so other
        jobs' headers (and builds) are none of this session's business. Where the write cannot be
        watched, what changed there since :meth:`begin` counts instead (``changed``)."""
        assert self.dirs is not None and self.dirs.pch is not None
        names = set(self._headers_installed)
        if self._headers_watched:
            from bundler.integrations import torch_gate

            root = os.path.abspath(self.dirs.pch)
            for path in torch_gate.header_writes():
                rel = os.path.relpath(os.path.abspath(path), root)
                if rel != "." and not rel.startswith(".."):
                    names.update((f"{PCH}/{rel}", f"{PCH}/{rel}.gch"))
            return names
        if changed is None:
            now = _scan({PCH: self.dirs.pch})[PCH]
            changed = _Snapshot(now).changed_since(self._before.get(PCH, _Snapshot({})))
        return names | set(changed)

    def _maybe_push(self, added: dict[str, list[str]]) -> None:
        """Push after a miss, or after a hit or failed fetch that still added files."""
        from bundler.remote import health

        if self.status in ("hit", "error", "refused") and not any(added.values()):
            return  # a complete warm start (the bundle already describes this job), or nothing new
        picked = _picked_vec_isa()
        if picked not in (None, self.facts.get("cpu_isa"), "unknown"):
            log.warning("torch compile cache: Inductor picked CPU ISA %s, predicted %s; not pushing a bundle "
                        "whose facts would be wrong", picked, self.facts.get("cpu_isa"))
            return
        health.guarded(self.settings, "write", self.ref or "", functools.partial(self._push_now, added), wait=False)

    def _push_now(self, added: Mapping[str, list[str]]) -> None:
        from bundler.integrations.torch_relocate import portable_source
        from bundler.remote import transfer
        from bundler.remote.refs import LINKED_FACT

        assert self.dirs is not None and self.ref is not None
        layers = self.dirs.layers()
        captured = _capture(layers)
        headers = self._header_capture() if self.dirs.pch is not None else {}
        source = portable_source(layers, {n: p for n, p in captured.items() if not n.startswith(PCH + "/")})
        if not source:
            return
        producer = self._producer()
        header_entry = self._header_entry(headers, added, producer) if headers else None
        dirs = {name: str(path) for name, path in layers.items()}
        # Also in the manifest, for refs that an offline `bundler import` writes (no extra there).
        producer.update({f"{_DIR_FACT}{name}": path for name, path in dirs.items()})
        if header_entry is not None:
            producer[f"{LINKED_FACT}{PCH}"] = header_entry["digest"]
        extra = {
            "dirs": dirs,
            "inductor_compile_s": round(_inductor_compile_s() - self._compile_s_before, 3),
            "inductor_settings": self._job_settings.inductor,
            "functorch_settings": self._job_settings.functorch,
        }
        from bundler.integrations import torch_missdiff

        fx_details = torch_missdiff.for_ref(source, self._fx_details, self._bundle_fx)  # capped at 256 KiB
        if fx_details:
            extra["fx_key_details"] = fx_details
        if header_entry is not None:
            extra["bundles"] = {PCH: header_entry}
        result = transfer.push(self._open_store(), source, ref=self.ref, ref_extra=extra, producer=producer,
                               settings=self.settings)
        self.pushed_bytes += result.size
        self.pushed_digest = result.digest
        log.info("torch compile cache: pushed %s (%d files, %d bytes) as %s",
                 result.digest[:12], len(result.manifest.files), result.size, self.ref)

    def _header_entry(self, headers: Mapping[str, str], added: Mapping[str, list[str]],
                      producer: Mapping[str, str]) -> dict[str, Any]:
        """The header bundle the ref names, pushed before the ref (so a ref never names a bundle
        that is not there yet). Reused without packing ~150 MB again where possible: the installed
        one when this session left the header folder as pulled, or the one pushed while the job
        ran (:meth:`_push_headers_early`) when the folder is as it was packed. Either only while it is
        still stored and young enough that gc spares it: the early push may be hours old by now,
        and no ref named it meanwhile."""
        from bundler.remote import transfer

        store = self._open_store()
        if (self._headers is not None and not added.get(PCH) and sorted(headers) == sorted(self._headers_installed)
                and transfer.stored_and_fresh(store, self._headers["digest"])):
            return dict(self._headers)
        if (self._early_headers is not None and self._early_headers[1] == self._header_files()
                and transfer.stored_and_fresh(store, self._early_headers[0]["digest"])):
            self.pushed_bytes += int(self._early_headers[0]["size"])
            return dict(self._early_headers[0])
        entry = self._push_header_bundle(headers, producer)
        self.pushed_bytes += int(entry["size"])
        return entry

    def _push_header_bundle(self, headers: Mapping[str, str], producer: Mapping[str, str],
                            threads: int | None = None) -> dict[str, Any]:
        from bundler.remote import transfer

        settings = self.settings.replace(zstd_level=_HEADER_BUNDLE_LEVEL, long_window_log=0)  # type: ignore[union-attr]
        if threads is not None:
            settings = settings.replace(zstd_threads=threads)
        result = transfer.push(self._open_store(), dict(headers), producer=producer, settings=settings)
        return {"digest": result.digest, "size": result.size, "files": len(result.manifest.files)}

    def _producer(self) -> dict[str, str]:
        """The manifest's producer facts: who packed it, and this environment's facts."""
        from bundler import keys

        return {**keys.producer_facts(), **self.facts}

    def _header_files(self) -> dict[str, tuple[int, int]]:
        """This session's header files (member name -> size, mtime), as a snapshot compares them."""
        assert self.dirs is not None and self.dirs.pch is not None
        ours = self._session_headers()
        return {name: stat for name, stat in _scan({PCH: self.dirs.pch})[PCH].items() if name in ours}

    def _header_capture(self) -> dict[str, str]:
        """This session's header files (member name -> path), for a push."""
        assert self.dirs is not None and self.dirs.pch is not None
        ours = self._session_headers()
        return {name: path for name, path in _capture({PCH: self.dirs.pch}).items() if name in ours}

    def _push_headers_early(self) -> None:
        """After a compile, on the job's thread: start pushing the precompiled headers it built.

        The header is nearly all of a CPU bundle's bytes and is final once built; packing it while
        the job trains takes it off the end of the session, where a cold job would wait for it.
        Only after a miss (a hit brought its headers), and once: ``end`` packs anything later.
        """
        if not self._done.is_set() or self._status == "hit" or self._early_thread is not None:
            return
        if not self._header_files():  # this graph built no header: look again after the next one
            from bundler.integrations import torch_gate

            torch_gate.after_next_compile(self._after_compile)
            return
        thread = threading.Thread(target=self._push_headers_in_background, name="bundler-torch-headers", daemon=True)
        thread.start()
        self._early_thread = thread  # only once started: end() joins it

    def _push_headers_in_background(self) -> None:
        from bundler.remote import health

        assert self.dirs is not None and self.settings is not None
        _yield_cpu()  # the compile goes on meanwhile, and it is what the job waits for
        try:
            before = self._header_files()
            headers = self._header_capture()
            entry = health.guarded(self.settings, "write", "precompiled headers", functools.partial(
                self._push_header_bundle, headers, self._producer(), threads=1), wait=False)
            if entry is not None and self._header_files() == before:
                self._early_headers = (entry, before)
                log.info("torch compile cache: pushed the precompiled headers (%s, %d bytes) while the job runs",
                         entry["digest"][:12], entry["size"])
        except Exception as exc:  # noqa: BLE001 - end() packs the headers itself
            log.debug("early push of the precompiled headers failed: %s", exc)

    def _check_strict(self, work: dict[str, int], added: dict[str, list[str]]) -> None:
        problems = [f"{name}={count}" for name, count in sorted(work.items())]
        builds = _cpp_builds(added)
        if builds:
            problems.append(f"cpp_builds={len(builds)} ({', '.join(builds[:3])})")
        remade = _remade_files(added)
        if remade:
            problems.append(f"files_made_anew={len(remade)} ({', '.join(remade[:3])})")
        if self._status != "hit":
            problems.insert(0, f"no bundle installed ({self._status}: {self._reason or self._explanation})")
        if problems:
            raise IncompleteWarmStart(
                f"BUNDLER_STRICT: the torch compile cache {self._ref} did not give a complete warm start: "
                + "; ".join(problems)
                + ". Re-bake the bundle in the same environment (see `explain`), or unset BUNDLER_STRICT"
            )

    def _make_summary(self, work: dict[str, int], added: dict[str, list[str]]) -> str:
        elapsed = time.monotonic() - self._started
        hits = _layer_counts()
        parts = [f"torch compile cache {self._status}"]
        if self._ref:
            parts.append(f"ref {self._ref}")
        parts.append(f"fx graphs {hits['fx_hit']} hit/{hits['fx_miss']} missed, "
                     f"aot autograd {hits['aot_hit']} hit/{hits['aot_miss']} missed")
        if self._status == "hit":
            from bundler.integrations import torch_lookups

            unused = torch_lookups.summary_phrase(self._installed_members, self._lookups)
            if unused:
                parts.append(unused)
            if self._fx_miss_phrase:
                parts.append(self._fx_miss_phrase)
        parts.append(f"C++ builds {len(_cpp_builds(added))}")
        if self._pulled_bytes:
            parts.append(f"pulled {self._pulled_files} files / {_mib(self._pulled_bytes)}")
        if self.pushed_bytes:
            parts.append(f"pushed {_mib(self.pushed_bytes)}")
        if self._producer_compile_s is not None and self._status == "hit":
            ours = _inductor_compile_s() - self._compile_s_before
            parts.append(f"compile time saved ~{max(0.0, self._producer_compile_s - ours):.1f} s")
        if self._status in ("refused", "error") and self._reason:
            parts.append(self._reason)
        if self._status == "miss" and self._explanation:
            parts.append(self._explanation)
        if self._prepare_s is not None:
            held = f"first compile held {self._held_s:.1f} s"
            if self._headers_held_s >= 0.05:
                held += f", header build held {self._headers_held_s:.1f} s"
            parts.append(f"fetch {self._prepare_s:.1f} s in the background, {held}")
        parts.append(f"session {elapsed:.1f} s")
        return "; ".join(parts)

    def summary_line(self) -> str:
        """The one-line summary logged by :meth:`end` (empty before it)."""
        return self._summary

    def _snapshot(self) -> dict[str, _Snapshot]:
        if self.dirs is None:
            return {}
        return {layer: _Snapshot(files) for layer, files in _scan(self.dirs.layers()).items()}

    # -- context manager -------------------------------------------------------------------------

    def __enter__(self) -> CompileCache:
        return self.begin()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end(failed=exc_type is not None)


def compile_cache(
    remote: str | None = None,
    *,
    ref: str | None = None,
    tag: str | None = None,
    strict: bool | None = None,
    push: bool = True,
    background: bool = True,
    settings: Settings | None = None,
) -> CompileCache:
    """A torch compile cache session for a ``with`` block (see the module docstring).

    ``remote``: store URL (default ``BUNDLER_REMOTE``); ``ref``: ref prefix naming the job
    (default ``BUNDLER_REF``, else ``torch``; the environment's fact hash is appended, so under
    ``bundler warm --ref NAME`` the session pulls and pushes ``NAME/<facts>`` itself); ``tag``: user salt (default
    ``BUNDLER_TAG``); ``strict``: raise :class:`IncompleteWarmStart` when the job compiled anything
    (default ``BUNDLER_STRICT``); ``push``: push after a miss (turn off on read-only nodes);
    ``background``: fetch while the job starts up, holding only Inductor's first compile until the
    bundle is in place (``False``: ``begin`` returns when it is).
    """
    return CompileCache(remote, ref=ref, tag=tag, strict=strict, push=push, background=background,
                        settings=settings)


def begin(remote: str | None = None, **kwargs: Any) -> CompileCache:
    """``compile_cache(...).begin()``: for scripts where a ``with`` block does not fit."""
    return compile_cache(remote, **kwargs).begin()


def end(session: CompileCache) -> None:
    """Finish a session started with :func:`begin`."""
    session.end()


def explain(remote: str | None = None, *, ref: str | None = None, tag: str | None = None,
            settings: Settings | None = None) -> str:
    """Why this environment would hit or miss: the ref it would use and, if that is missing, the
    nearest existing ref under the same prefix with every fact that differs."""
    settings = settings or Settings.from_env()
    if remote is not None:
        settings = settings.replace(remote=remote)
    if not settings.remote:
        raise ConfigError("explain needs a store: pass remote= or set BUNDLER_REMOTE")
    from bundler.remote.refs import read_ref
    from bundler.stores import open_store

    facts = environment_facts(tag if tag is not None else settings.tag)
    prefix = ref or settings.ref or REF_PREFIX
    name = ref_name(facts, prefix)
    with open_store(settings.remote, settings) as store:
        try:
            found = read_ref(store, name, settings)
        except NotFoundError:
            return f"miss: no bundle {name}; " + _nearest(store, prefix, facts, settings)
        differing = fact_differences(facts, found.producer)
        if differing:
            return f"refused: {name}: " + "; ".join(differing)
        return f"hit: {name} ({found.size} bytes, made {found.created})"


def _nearest(store: Any, prefix: str, facts: Mapping[str, str], settings: Settings,
             ours: Mapping[str, str] | None = None) -> str:
    """The ref under ``prefix/`` whose facts differ least from ours, and how they differ.
    ``ours``: our Inductor settings (default: read on this thread)."""
    from bundler.remote import layout
    from bundler.remote.refs import read_ref

    start = layout.REFS + prefix.rstrip("/") + "/"
    infos = sorted(store.list(start), key=lambda info: str(info.modified or ""), reverse=True)
    best: tuple[int, str, list[str], Any] | None = None
    for info in infos[:_EXPLAIN_MAX_REFS]:
        name = layout.ref_name_from_key(info.key)
        if name is None:
            continue
        try:
            other = read_ref(store, name, settings)
        except BundlerError:
            continue
        differing = fact_differences(facts, other.producer)
        if "inductor_config" in other.producer and other.producer.get("inductor_config") != facts.get(
            "inductor_config"
        ):
            ours = ours if ours is not None else _config_dict("torch._inductor.config")
            theirs = other.extra.get("inductor_settings")
            if isinstance(theirs, dict):
                differing += _settings_differences(ours, theirs, "inductor")[:3]
        if best is None or len(differing) < best[0]:
            best = (len(differing), name, differing, other)
    if best is None:
        return f"no bundle under {prefix}/ in {store.url}: the first run of this job pushes one"
    _, name, differing, _ = best
    return f"nearest bundle {name} differs: " + "; ".join(differing)


def _yield_cpu() -> None:
    """Run this thread (and the zstd workers it starts, which inherit it) at the lowest priority.

    Linux keeps a nice value per thread. On a 2-core machine, packing the header at normal priority
    beside the compile made a cold CPU session ~2 s slower; at nice 19 with one compression thread
    it takes the CPU the compile leaves idle. Elsewhere this does nothing.
    """
    get_id = getattr(threading, "get_native_id", None)
    if sys.platform != "linux" or get_id is None:
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, get_id(), 19)


def _header_bundle(found: Any) -> dict[str, Any] | None:
    """The ref's precompiled-header bundle (``extra.bundles.pch``, or the manifest's
    ``bundle.pch`` fact in an imported ref), checked; None if it names none."""
    from bundler.remote.refs import linked_bundles

    digest = linked_bundles(found.extra, found.producer).get(PCH)
    if digest is None:
        return None
    bundles = found.extra.get("bundles")
    entry = bundles.get(PCH) if isinstance(bundles, Mapping) else None
    entry = entry if isinstance(entry, Mapping) and entry.get("digest") == digest else {}
    size, files = entry.get("size"), entry.get("files")
    return {"digest": digest, "size": size if isinstance(size, int) else 0, "files": files if isinstance(files, int) else 0}


def _producer_dirs(found: Any) -> dict[str, str]:
    """The producer's directory per layer: from the ref's ``extra.dirs``, or from the manifest's
    ``dir.<layer>`` facts (a ref that an offline ``bundler import`` wrote has no ``extra``)."""
    dirs = found.extra.get("dirs")
    if isinstance(dirs, Mapping):
        return {str(name): str(path) for name, path in dirs.items()}
    return {key[len(_DIR_FACT):]: value for key, value in found.producer.items()
            if key.startswith(_DIR_FACT) and isinstance(value, str)}


def _remade_files(added: Mapping[str, list[str]]) -> list[str]:
    """Tuning results and GPU binaries written during the session: runtime re-tuning."""
    return [name for names in added.values() for name in names
            if name.endswith(_WORK_SUFFIXES) and not name.endswith((".so", ".gch"))]


def _cpp_builds(added: Mapping[str, list[str]]) -> list[str]:
    return [name for names in added.values() for name in names if name.endswith((".so", ".gch"))]


def _strict_from_env(settings: Settings) -> bool:
    return settings.strict


# --- counters and files ---------------------------------------------------------------------------


def _work_counters() -> dict[tuple[str, str], int]:
    from torch._dynamo.utils import counters

    return {key: int(counters[key[0]].get(key[1], 0)) for key in _WORK_COUNTERS}


def _layer_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "fx_hit": int(counters["inductor"].get("fxgraph_cache_hit", 0)),
        "fx_miss": int(counters["inductor"].get("fxgraph_cache_miss", 0)),
        "aot_hit": int(counters["aot_autograd"].get("autograd_cache_hit", 0)),
        "aot_miss": int(counters["aot_autograd"].get("autograd_cache_miss", 0)),
    }


def _inductor_compile_s() -> float:
    """Seconds this process spent in Inductor's compile (``compile_fx_inner``), hits included."""
    try:
        from torch._dynamo.utils import compilation_time_metrics

        return float(sum(compilation_time_metrics.get("compile_fx_inner", [])))
    except Exception:  # noqa: BLE001
        return 0.0


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _skip(name: str) -> bool:
    """Names never captured: locks, build and staging scratch, atomic-write temporaries."""
    return (
        name == "locks"
        or name.endswith((".lock", ".tmp"))
        or name.endswith("_CxxBuild")
        or name.startswith((".bundler-staging-", "tmp."))
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _walk(root: Path, nested: frozenset[str] = frozenset()) -> Iterator[tuple[str, os.DirEntry]]:
    """Files under ``root``, skipping :func:`_skip` names and ``nested`` (other layers' roots)."""
    stack = [(str(root), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if _skip(entry.name):
                continue
            name = f"{rel}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if entry.path not in nested:
                    stack.append((entry.path, name + "/"))
            elif entry.is_file(follow_symlinks=False):
                yield name, entry


def _scan(layers: Mapping[str, Path]) -> dict[str, dict[str, tuple[int, int]]]:
    out: dict[str, dict[str, tuple[int, int]]] = {}
    nested = _roots(layers)
    for layer, root in layers.items():
        files = {}
        for name, entry in _walk(root, nested):
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                files[f"{layer}/{name}"] = (st.st_size, st.st_mtime_ns)
        out[layer] = files
    return out


def _file_sha256(layers: Mapping[str, Path], member: str) -> str | None:
    """sha256 of the local file behind a member name (``<layer>/<path>``); None if unreadable."""
    layer, _, rel = member.partition("/")
    root = layers.get(layer)
    if root is None:
        return None
    digest = hashlib.sha256()
    try:
        with open(root / rel, "rb") as f:
            for block in iter(functools.partial(f.read, 1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _capture(layers: Mapping[str, Path]) -> dict[str, str]:
    """Member name -> local path of every file in the layers (tree capture; see docs/torch.md)."""
    out = {}
    nested = _roots(layers)
    for layer, root in layers.items():
        for name, entry in _walk(root, nested):
            out[f"{layer}/{name}"] = entry.path
    return out


def _roots(layers: Mapping[str, Path]) -> frozenset[str]:
    return frozenset(str(root) for root in layers.values())
