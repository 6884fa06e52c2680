"""Per-kernel best-config cache: one small JSON record per kernel, on local disk and in the store.

The shape follows PyTorch Inductor's ``AutotuneCache`` (``torch/_inductor/runtime/autotune_cache.py``)
so code written against it ports directly: ``create(meta, filename, configs_hash)`` returns None
when no cache is usable, ``read_best(configs)`` looks in the most local cache first, ``save(...)``
writes the winner. Differences, and why:

* The key mixes the kernel file's basename, the kernel facts in ``meta`` (JSON, all of it), the
  user tag and :func:`bundler.keys.version_salt` (Triton version, backend hash, format version),
  so an upgrade or a move to another GPU misses instead of loading a stale winner. Inductor's
  filename is already a content hash; for hand-written kernels the Triton integration puts the
  kernel name, its comment-blind source hash and the tuning key into ``meta``.
* The configs hash is *not* in the key but checked inside the record, as Inductor does, so a
  changed config list is a miss that says so in the log instead of a silent new key.
* Config kwargs are stored under their own ``"kwargs"`` key, so a kernel parameter called
  ``num_warps`` cannot be confused with the launch option.
* The remote side is best effort: a store error is one logged warning and a miss, and it trips
  the remote's read or write breaker (``bundler.remote.health``), so a dead endpoint costs one
  timeout, not one per kernel, and a denied write does not stop reads.
* With signing configured (``BUNDLER_SIGNING_KEY``, ``BUNDLER_SIGNING_KEY_FILE`` or
  ``BUNDLER_TRUSTED_KEYS``, see ``bundler.remote.signing``), records are signed when saved (the
  signature covers the record, its kind and its key, so it cannot be copied to another kernel) and
  a remote record without a valid signature is a miss: a winner is only a launch configuration, but
  whoever can write the bucket should not choose what every node runs (DESIGN.md, threat model).
  A process that holds only public keys does not write records to the store. Local records are the
  node's own and bundles are covered by their signed refs, so those are not checked.
* Every record, signed or not, is checked against the candidates before a config is built from
  it: each value of the candidates' type and within sane bounds (``num_warps`` a power of two up
  to 64, block sizes not 2**31), so a foreign record is a miss, not a launch that fails or hangs.

Local records live in ``<cache_dir>/autotune/<key>.json`` (written to a temp file and renamed into
place), remote ones under ``v1/autotune/<key>.json``. Every record saved or hit is also recorded
in-process (``bundler.recording``) so compile sessions and ``save_artifacts()`` can ship it.

This module never imports Triton: configs are duck-typed, and a reconstructed config is made
with the class of the candidates the caller passed in.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bundler import keys, logs, recording
from bundler.config import Settings
from bundler.errors import ConfigError
from bundler.fileio import write_atomically
from bundler.remote import health as shared
from bundler.remote import layout, signing

log = logging.getLogger(__name__)

RECORD_FORMAT = "kernel-bundler/autotune"
RECORD_VERSION = 1

#: The largest remote record read: real ones are well under a kilobyte, and whoever can write the
#: bucket must not make every training process allocate gigabytes.
RECORD_LIMIT = 1 << 20

# Config attributes that are never part of a record: the kwargs travel separately, and a
# pre_hook is code that cannot be serialised (a config with one is matched by the rest).
_NOT_FIELDS = {"self", "kwargs", "pre_hook"}


# --- configs -------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for like-for-like comparison."""
    return json.loads(json.dumps(value, default=repr))


def config_fields(config: Any) -> dict[str, Any]:
    """A Triton ``Config``'s launch options, read from its constructor's parameters.

    Reading the signature instead of naming fields keeps records complete across Triton versions:
    3.6 and 3.9 have ``num_warps, num_stages, num_ctas, maxnreg, ir_override``; 3.2-3.3 also had the
    warp-specialisation fields (``num_buffers_warp_spec``, ``num_consumer_groups``,
    ``reg_dec_producer``, ``reg_inc_consumer``), which are then stored and matched the same way.
    """
    names = [n for n in inspect.signature(type(config).__init__).parameters if n not in _NOT_FIELDS]
    return {name: _jsonable(getattr(config, name)) for name in names if hasattr(config, name)}


def configs_hash(configs: Sequence[Any]) -> str:
    """Hash of a candidate list: any change to it makes stored winners a (reported) miss."""
    described = [
        {
            "kwargs": _jsonable(cfg.kwargs),
            "fields": config_fields(cfg),
            "pre_hook": getattr(getattr(cfg, "pre_hook", None), "__qualname__", None),
        }
        for cfg in configs
    ]
    return keys.hash_parts("configs-v1", keys.canonical_json(described))


# Config attributes a record never sets: code and file paths are not data a bucket may choose.
# A rebuilt config takes them from the candidates instead.
_FROM_CANDIDATES = ("pre_hook", "ir_override")

# What a kwarg value in a record may be: what a coordinate-descent search varies (block sizes and
# the like) is always one of these.
_SCALARS = (int, float, bool, str, type(None))


# Sane ranges for Triton's launch options, whatever the candidates hold: a record outside them
# was not written by a tuner (Triton wants num_warps a power of two; 2**31 warps would make the
# launch fail or allocate absurdly). Options not listed get the generic bound below.
_OPTION_RANGES: dict[str, tuple[int, int]] = {
    "num_warps": (1, 64),
    "num_stages": (0, 32),
    "num_ctas": (1, 16),
    "maxnreg": (1, 256),
    "num_buffers_warp_spec": (0, 64),
    "num_consumer_groups": (0, 64),
    "reg_dec_producer": (0, 256),
    "reg_inc_consumer": (0, 256),
}
_POWERS_OF_TWO = {"num_warps"}
# Any other number in a record: within this, or 64 times the largest the candidates have for the
# same name (coordinate descent doubles block sizes a few times past the candidates, not 2**20-fold).
_GENERIC_LIMIT = 1 << 20
_MAX_STRING = 256


def _out_of_bounds(name: str, value: Any, candidate_values: Sequence[Any]) -> bool:
    """True when ``value`` (a record's value for option or kwarg ``name``) is not a sane one."""
    if isinstance(value, str):
        return len(value) > _MAX_STRING
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return True
    if name in _OPTION_RANGES:
        low, high = _OPTION_RANGES[name]
        if not low <= value <= high:
            return True
        return name in _POWERS_OF_TWO and (int(value) != value or int(value) & (int(value) - 1) != 0)
    known = [abs(v) for v in candidate_values if isinstance(v, int | float) and not isinstance(v, bool)]
    return abs(value) > max([_GENERIC_LIMIT] + [64 * v for v in known if math.isfinite(v)])


def _matches(config: Any, record: Mapping[str, Any]) -> bool:
    if _jsonable(config.kwargs) != record.get("kwargs"):
        return False
    fields = config_fields(config)
    return all(fields[name] == value for name, value in record.get("fields", {}).items() if name in fields)


def _unusable(record: Mapping[str, Any], configs: Sequence[Any]) -> str | None:
    """Why the config in ``record`` cannot stand for one of ``configs``, or None when it can.

    A record holds only what the candidates could hold: their option names (less the code-like
    ones, which must be absent or equal to the candidates'), each value of a type some candidate
    has for it (or None), and their kwarg names with scalar values of a candidate's type (or a
    value a candidate has, such as a tuple stored as a list); every number within sane bounds
    (:func:`_out_of_bounds`). Anything else was not written by a tuner of these
    candidates, and Triton would otherwise act on it (call a ``pre_hook`` string, read an
    ``ir_override`` path) inside the user's launch.
    """
    described = [config_fields(cfg) for cfg in configs]
    for name, value in record.get("fields", {}).items():
        if name in _FROM_CANDIDATES or name in _NOT_FIELDS:
            if name != "ir_override" or any(value != fields.get(name) for fields in described):
                return f"option {name!r} is not the candidates' own"
            continue
        if not all(name in fields for fields in described):
            return f"option {name!r} is not one the candidate configs have"
        types = {type(fields[name]) for fields in described}
        if value is not None and type(value) not in types:
            return f"option {name}={value!r} is not of the candidates' type"
        if _out_of_bounds(name, value, [fields[name] for fields in described]):
            return f"option {name}={value!r} is out of any sane range"
    kwargs = record["kwargs"]
    if not any(set(kwargs) == set(cfg.kwargs) for cfg in configs):
        return f"its kwargs {sorted(kwargs)} are not the candidates' {sorted(configs[0].kwargs)}"
    for name, value in kwargs.items():
        theirs = [_jsonable(cfg.kwargs.get(name)) for cfg in configs]
        if value in theirs and type(value) in {type(v) for v in theirs if v == value}:
            continue  # exactly a candidate's value (a tuple stored as a list, say)
        if not isinstance(value, _SCALARS) or type(value) not in {type(v) for v in theirs}:
            return f"kwarg {name}={value!r} is not of the candidates' type"
        if _out_of_bounds(name, value, theirs):
            return f"kwarg {name}={value!r} is out of any sane range"
    time_taken = record.get("time_taken_ns", 0)
    if not 0 <= time_taken < 1 << 63:
        return f"time_taken_ns={time_taken!r} is out of range"
    return None


def _common(configs: Sequence[Any], name: str) -> tuple[bool, Any]:
    """(True, value) when every candidate has the same ``name`` attribute (None when absent)."""
    values = [getattr(cfg, name, None) for cfg in configs]
    return all(value is values[0] or value == values[0] for value in values), values[0]


def _rebuild(configs: Sequence[Any], record: Mapping[str, Any]) -> Any | None:
    """A new config of the candidates' type from a validated record, or None when it cannot be.

    Options come from the record (only those the candidates have, see :func:`_unusable`), the
    code-like ones (``pre_hook``, ``ir_override``) from the candidates, which must agree on them.
    """
    config_type = type(configs[0])
    accepted = inspect.signature(config_type.__init__).parameters
    options = {k: v for k, v in record.get("fields", {}).items() if k in accepted and k not in _FROM_CANDIDATES}
    for name in _FROM_CANDIDATES:
        same, value = _common(configs, name)
        if not same:
            log.debug("autotune: the candidates differ in %s; not rebuilding a tuned config", name)
            return None
        if name in accepted and value is not None:
            options[name] = value
    config = config_type(dict(record["kwargs"]), **options)
    config.found_by_coordesc = True
    return config


# --- process-wide statistics -----------------------------------------------------------------------


@dataclasses.dataclass
class AutotuneStats:
    """Counters for one process: what the cache saved, for logs and the demo's summary."""

    hits: int = 0
    misses: int = 0
    saves: int = 0
    time_saved_ns: int = 0


_stats = AutotuneStats()
_stats_lock = threading.Lock()


def _new_stats_lock() -> None:
    # A forked child (a DataLoader worker) must not inherit a lock a parent thread held.
    global _stats_lock
    _stats_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_stats_lock)


def stats() -> AutotuneStats:
    """A snapshot of this process's autotune cache counters."""
    with _stats_lock:
        return dataclasses.replace(_stats)


def _count(**deltas: int) -> None:
    with _stats_lock:
        for name, delta in deltas.items():
            setattr(_stats, name, getattr(_stats, name) + delta)


# --- the cache ---------------------------------------------------------------------------------------


class AutotuneCache:
    """Local and remote best-config lookups for one kernel (one tuning key of one kernel)."""

    def __init__(self, key: str, configs_hash: str, settings: Settings) -> None:
        self.key = layout.check_name(key, "autotune key")
        self.configs_hash = configs_hash
        self.settings = settings

    # creation ------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        meta: Mapping[str, Any],
        filename: str,
        configs_hash: str,
        *,
        settings: Settings | None = None,
    ) -> AutotuneCache | None:
        """The cache for one kernel, or None when neither the local nor the remote side is usable.

        ``meta``: JSON-able facts that identify the kernel beyond its file (all of them go into the
        key). ``filename``: the kernel's source file; only its basename is used, so the same
        kernel hits from any checkout path.
        """
        logs.from_env()  # BUNDLER_LOG, for jobs that tune without a compile session
        if settings is None:
            try:
                settings = Settings.from_env()
            except ConfigError as exc:
                log.warning("autotune cache off: %s", logs.one_line(exc))
                return None
        cache = cls(cls.make_key(meta, filename, settings), configs_hash, settings)
        return cache if cache.local_enabled or cache.remote_enabled else None

    @staticmethod
    def make_key(meta: Mapping[str, Any], filename: str, settings: Settings) -> str:
        return keys.hash_parts(
            "autotune-key-v1",
            os.path.basename(filename),
            keys.canonical_json(dict(meta)),
            keys.version_salt(settings.tag),
        )

    @property
    def local_enabled(self) -> bool:
        return self.settings.local_cache

    @property
    def remote_enabled(self) -> bool:
        return bool(self.settings.remote_autotune and self.settings.remote)

    @property
    def member_name(self) -> str:
        """The record's name inside bundles and artifacts."""
        return f"{recording.AUTOTUNE_ROOT}/{self.key}.json"

    @property
    def local_path(self) -> Path:
        return recording.autotune_dir(self.settings) / f"{self.key}.json"

    # reading -------------------------------------------------------------------------------------

    def read_best(self, configs: Sequence[Any]) -> Any | None:
        """The stored winner as one of ``configs`` (or a rebuilt coordinate-descent config), or None.

        A record made for another candidate list, or one that matches no candidate or several,
        is a miss: tuning again is always safe, loading the wrong config is not.
        """
        record = self._read()
        try:
            best = self._select(record, configs) if record is not None else None
        except (TypeError, ValueError) as exc:  # well-typed, yet unusable here (e.g. unknown options)
            log.warning("autotune cache %s: the stored config cannot be used (%s); tuning again", self.key[:12], logs.one_line(exc))
            best = None
        if best is None:
            _count(misses=1)
            return None
        _count(hits=1, time_saved_ns=int(record.get("time_taken_ns") or 0))  # type: ignore[union-attr]
        return best

    def _select(self, record: Mapping[str, Any], configs: Sequence[Any]) -> Any | None:
        if record.get("configs_hash") != self.configs_hash:
            log.info("autotune cache %s: the candidate configs changed since it was tuned; tuning again",
                     self.key[:12])
            return None
        if not configs:
            return None
        reason = _unusable(record, configs)
        if reason is not None:
            log.debug("autotune cache %s: the stored config does not fit the candidates (%s); tuning again",
                      self.key[:12], reason)
            return None
        if record.get("found_by_coordesc"):
            return _rebuild(configs, record)
        matching = [cfg for cfg in configs if _matches(cfg, record)]
        if len(matching) != 1:
            log.info("autotune cache %s: stored config matches %d candidates, not 1; tuning again",
                     self.key[:12], len(matching))
            return None
        return matching[0]

    def _read(self) -> dict[str, Any] | None:
        """The most local record: local file, else the store (then copied to the local file)."""
        recording.wait_for_pending()
        if self.local_enabled:
            data = self._read_local()
            if data is not None:
                record = _parse(data, self.local_path)
                if record is not None:
                    recording.record(self.member_name, data)
                    return record
        if self.remote_enabled:
            data = self._read_remote()
            if data is not None:
                record = _parse(data, self.settings.remote)
                if record is not None and self._trusted(record):
                    recording.record(self.member_name, data)
                    if self.local_enabled:
                        self._write_local(data)
                    return record
        return None

    def _read_local(self) -> bytes | None:
        try:
            return self.local_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("autotune cache: cannot read %s (%s); treating it as a miss", self.local_path, logs.one_line(exc))
            return None

    def _trusted(self, record: Mapping[str, Any]) -> bool:
        """A remote record is trusted when no signing is configured or its signature checks out."""
        try:
            problem = signing.keyring(self.settings).problem(
                RECORD_KIND, self.key, _signed_body(record), record.get("signature"))
        except ConfigError as exc:  # a key file gone missing: a miss, never an error in the job
            problem = f"cannot be checked ({exc})"
        if problem is None:
            return True
        remote = str(self.settings.remote)
        if remote not in _unsigned_warned:
            _unsigned_warned.add(remote)
            log.warning("autotune cache: record %s in %s %s, and signing is configured: ignoring it (and, "
                        "quietly, any other such record); the kernel is tuned again", self.key[:12], remote, problem)
        return False

    def _read_remote(self) -> bytes | None:
        """The record in the store, under the failure policy (``remote.health.guarded``): a dead or
        slow store costs the job at most what is left of its wait budget, and one warning."""
        key = layout.autotune_key(self.key)
        return shared.guarded(
            self.settings, "read", key, lambda: shared.shared_store(self.settings).read_bytes(key, limit=RECORD_LIMIT)
        )

    # writing -------------------------------------------------------------------------------------

    def save(
        self,
        config: Any,
        time_taken_ns: int,
        found_by_coordesc: bool = False,
        triton_cache_hash: str | None = None,
    ) -> None:
        """Store ``config`` as this kernel's winner, locally and remotely; never raises on I/O."""
        record = {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "kwargs": _jsonable(config.kwargs),
            "fields": config_fields(config),
            "configs_hash": self.configs_hash,
            "found_by_coordesc": bool(found_by_coordesc),
            "time_taken_ns": int(time_taken_ns),
            "triton_cache_hash": triton_cache_hash,
        }
        may_push = self._sign(record)
        data = json.dumps(record, sort_keys=True, indent=1).encode("utf-8")
        recording.record(self.member_name, data)
        _count(saves=1)
        if self.local_enabled:
            self._write_local(data)
        if may_push and self.remote_enabled:
            key = layout.autotune_key(self.key)
            shared.guarded(self.settings, "write", key, lambda: shared.shared_store(self.settings).write_bytes(key, data))

    def _sign(self, record: dict[str, Any]) -> bool:
        """Add the signature when signing is configured; False when the record must stay local
        (only public keys here, or a key that cannot be loaded): others would refuse it anyway."""
        try:
            keys = signing.keyring(self.settings)
            if keys.enabled:
                record["signature"] = keys.sign(RECORD_KIND, self.key, _signed_body(record))
        except ConfigError as exc:
            log.warning("autotune cache: record %s is kept local, not pushed: %s", self.key[:12], logs.one_line(exc))
            return False
        return True

    def _write_local(self, data: bytes) -> None:
        """Temp file in the same directory, then ``os.replace``: readers see all of it or nothing."""
        path = self.local_path
        try:
            write_atomically(path, data)
        except OSError as exc:
            log.warning("autotune cache: cannot write %s (%s); the result is kept only in memory", path, logs.one_line(exc))

    # pickling ------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # Nothing process-bound lives on the instance (stores are opened per process by
        # shared_store), so the state is plain data; stated explicitly because compile workers
        # pickle these to their parent and that must keep working if a handle is ever cached here.
        return {"key": self.key, "configs_hash": self.configs_hash, "settings": self.settings}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__init__(state["key"], state["configs_hash"], state["settings"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"AutotuneCache(key={self.key[:12]}..., local={self.local_enabled}, remote={self.remote_enabled})"


# Optional record fields and their JSON types; a record that breaks them is foreign or corrupt.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "fields": dict,
    "configs_hash": str,
    "found_by_coordesc": bool,
    "time_taken_ns": int,
    "triton_cache_hash": (str, type(None)),
    "signature": str,
}

# Remotes whose unsigned records were already warned about (one warning per process each).
_unsigned_warned: set[str] = set()

#: The signed document kind of a record (see ``bundler.remote.signing``).
RECORD_KIND = "autotune-record"


def _signed_body(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a record's signature covers besides its kind and key: every field but the signature."""
    return {k: v for k, v in record.items() if k != "signature"}


def _parse(data: bytes, where: object) -> dict[str, Any] | None:
    """The record in ``data`` if it is one of ours with every field of the right type, else None."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        record = None
    if not (isinstance(record, dict) and record.get("format") == RECORD_FORMAT
            and record.get("version") == RECORD_VERSION and isinstance(record.get("kwargs"), dict)
            and all(isinstance(record[name], kind) for name, kind in _FIELD_TYPES.items() if name in record)):
        log.warning("autotune cache: ignoring an unreadable or foreign record from %s", where)
        return None
    return record
