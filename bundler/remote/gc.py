"""Housekeeping for a store: plan what to delete, show it, then delete it (``bundler gc``).

Two steps, as in huggingface_hub's cache cleaning: :func:`plan` is a pure function over listings
(it is what the tests pin down and what a dry run prints), :func:`execute` carries a plan out
against the live store, re-checking what may have changed since the listing.

What goes, in this order:

1. Refs, by retention: refs are grouped by *prefix* (the part of the name before the last ``/``;
   ``llama/h100`` and ``llama/a100`` share ``llama``, a name without ``/`` is in the group ``""``).
   ``keep_last`` keeps the newest N of each group; ``older_than`` deletes refs not written for
   that long. A ref kept by one rule and deleted by the other is deleted.
2. Bundles that no remaining ref names *and* that are older than ``grace``. The grace period is
   what keeps a push in flight safe: a push uploads its bundle first and writes its ref after, so
   for a moment a new bundle is unreferenced. A push that finds its bundle already stored (and
   old) rewrites it, which makes it new again (``transfer.REFRESH_AFTER_S``, below the default grace).

What :func:`execute` re-checks, because the store keeps changing while gc runs: a ref is deleted
only if it still holds what the plan saw (a push that moved it meanwhile keeps it); before any
bundle is deleted the refs are listed and read again, and a bundle a ref now names is kept, as is
one whose date moved into the grace period. S3 has no conditional delete, so a ref rewritten in the
instant between the re-read and the delete can still be lost; the grace period makes that window a
single request wide, and the next push repairs it.

Refs are read raw (digest only, no signature check): gc must keep the bundle of a ref it could not
verify, never delete it because it could not.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from bundler.errors import ConfigError, NotFoundError
from bundler.remote import layout
from bundler.remote.refs import linked_bundles
from bundler.stores.base import Store

log = logging.getLogger(__name__)

#: The default grace period for unreferenced bundles: far above any push's upload-to-ref time.
DEFAULT_GRACE_S = 3600.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, what: str = "duration") -> float:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` or plain seconds, as seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"{what} {text!r} is not a duration; use a number with s, m, h, d or w (e.g. 7d, 12h)")
    return float(match.group(1)) * _UNIT_S[match.group(2).lower()]


@dataclasses.dataclass(frozen=True)
class RefEntry:
    """A ref as listed: its name, the digest it names (None when unreadable) and its date."""

    name: str
    digest: str | None
    modified: dt.datetime | None
    fingerprint: str = ""  # sha256 of the raw document: "has it changed since the plan?"
    also: tuple[str, ...] = ()  # bundles the ref needs besides its own (``extra.bundles``: torch headers)

    @property
    def digests(self) -> set[str]:
        return ({self.digest} if self.digest else set()) | set(self.also)

    @property
    def prefix(self) -> str:
        return self.name.rsplit("/", 1)[0] if "/" in self.name else ""


@dataclasses.dataclass(frozen=True)
class BundleEntry:
    digest: str
    size: int
    modified: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Policy:
    """Retention: ``keep_last`` refs per prefix, refs ``older_than`` seconds go, bundles after ``grace``."""

    keep_last: int | None = None
    older_than: float | None = None
    grace: float = DEFAULT_GRACE_S

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"--keep-last {self.keep_last}: keep at least 1 ref per prefix (or leave it out)")
        if self.grace < 0 or (self.older_than is not None and self.older_than < 0):
            raise ConfigError("durations must not be negative")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What gc would delete and why it keeps the rest; ``to_json()`` is what ``--json`` prints."""

    now: dt.datetime
    policy: Policy
    delete_refs: tuple[tuple[RefEntry, str], ...]
    keep_refs: tuple[RefEntry, ...]
    delete_bundles: tuple[BundleEntry, ...]
    keep_bundles: tuple[tuple[BundleEntry, str], ...]

    @property
    def freed_bytes(self) -> int:
        return sum(b.size for b in self.delete_bundles)

    def to_json(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(timespec="seconds"),
            "policy": dataclasses.asdict(self.policy),
            "delete_refs": [{"name": r.name, "digest": r.digest, "modified": _iso(r.modified), "why": why}
                            for r, why in self.delete_refs],
            "keep_refs": [{"name": r.name, "digest": r.digest, "modified": _iso(r.modified)} for r in self.keep_refs],
            "delete_bundles": [{"digest": b.digest, "size": b.size, "modified": _iso(b.modified)}
                               for b in self.delete_bundles],
            "keep_bundles": [{"digest": b.digest, "size": b.size, "modified": _iso(b.modified), "why": why}
                             for b, why in self.keep_bundles],
            "freed_bytes": self.freed_bytes,
        }


def plan(refs: Iterable[RefEntry], bundles: Iterable[BundleEntry], policy: Policy, now: dt.datetime) -> Plan:
    """Decide, from listings alone, which refs and bundles go (pure: no store, no clock)."""
    refs, bundles = list(refs), list(bundles)
    doomed: dict[str, str] = {}
    groups: dict[str, list[RefEntry]] = {}
    for ref in refs:
        groups.setdefault(ref.prefix, []).append(ref)
    for group in groups.values():
        newest_first = sorted(group, key=lambda r: (_ts(r.modified), r.name), reverse=True)
        if policy.keep_last is not None:
            for ref in newest_first[policy.keep_last:]:
                doomed[ref.name] = f"beyond the newest {policy.keep_last} of prefix {ref.prefix or '(none)'!r}"
    if policy.older_than is not None:
        for ref in refs:
            if ref.modified is not None and _age(now, ref.modified) > policy.older_than:
                doomed.setdefault(ref.name, f"not written for {_human(_age(now, ref.modified))}")
    delete_refs = tuple((r, doomed[r.name]) for r in refs if r.name in doomed)
    keep_refs = tuple(r for r in refs if r.name not in doomed)
    named = {digest for r in keep_refs for digest in r.digests}
    delete_bundles: list[BundleEntry] = []
    keep_bundles: list[tuple[BundleEntry, str]] = []
    for bundle in bundles:
        if bundle.digest in named:
            keep_bundles.append((bundle, "named by a ref"))
        elif bundle.modified is None or _age(now, bundle.modified) <= policy.grace:
            keep_bundles.append((bundle, "within the grace period (a push may be in flight)"))
        else:
            delete_bundles.append(bundle)
    return Plan(now, policy, delete_refs, keep_refs, tuple(delete_bundles), tuple(keep_bundles))


def gather(store: Store) -> tuple[list[RefEntry], list[BundleEntry]]:
    """List the store's refs (each read raw for its digest) and bundles."""
    refs = list(_read_refs(store))
    bundles = []
    for info in store.list(layout.BUNDLES):
        digest = layout.digest_from_bundle_key(info.key)
        if digest is not None:
            bundles.append(BundleEntry(digest, info.size, info.modified))
    return refs, bundles


def _read_refs(store: Store) -> Iterable[RefEntry]:
    for info in store.list(layout.REFS):
        name = layout.ref_name_from_key(info.key)
        if name is None:
            continue
        try:
            raw = store.read_bytes(info.key)
        except NotFoundError:
            continue  # deleted since the listing
        doc = _document(raw)
        yield RefEntry(name, _digest_of(doc), info.modified, hashlib.sha256(raw).hexdigest(), _also_of(doc))


def _document(raw: bytes) -> Mapping[str, Any] | None:
    """A ref document parsed once for both readings; None when it is not a JSON object."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, Mapping) else None


def _digest_of(doc: Mapping[str, Any] | None) -> str | None:
    """The digest a ref document names, unverified; None when it names none we can read."""
    try:
        return layout.check_digest(doc["digest"]) if doc is not None else None
    except (KeyError, TypeError, ConfigError):
        return None


def _also_of(doc: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The other bundles a ref needs (:func:`refs.linked_bundles`): a torch ref keeps its
    precompiled headers in a bundle of their own, and deleting it would cost every warm start of
    the ref a header build."""
    if doc is None:
        return ()
    return tuple(sorted(set(linked_bundles(doc.get("extra"), doc.get("producer")).values())))


@dataclasses.dataclass(frozen=True)
class Outcome:
    deleted_refs: tuple[str, ...]
    deleted_bundles: tuple[str, ...]
    spared: tuple[tuple[str, str], ...]  # (ref name or bundle digest, why it was kept after all)

    def to_json(self) -> dict[str, Any]:
        return {"deleted_refs": list(self.deleted_refs), "deleted_bundles": list(self.deleted_bundles),
                "spared": [{"name": n, "why": why} for n, why in self.spared]}


def execute(store: Store, the_plan: Plan, *, clock=None) -> Outcome:  # noqa: ANN001 - () -> datetime
    """Carry out ``the_plan``, re-checking refs and bundle dates against the live store first."""
    clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
    deleted_refs: list[str] = []
    spared: list[tuple[str, str]] = []
    for ref, _why in the_plan.delete_refs:
        key = layout.ref_key(ref.name)
        try:
            current = store.read_bytes(key)
        except NotFoundError:
            continue
        if hashlib.sha256(current).hexdigest() != ref.fingerprint:
            spared.append((ref.name, "rewritten since the plan"))
            continue
        store.delete(key)
        deleted_refs.append(ref.name)
        log.info("gc: deleted ref %s", ref.name)
    deleted_bundles: list[str] = []
    if the_plan.delete_bundles:
        named = {digest for r in _read_refs(store) for digest in r.digests}
        for bundle in the_plan.delete_bundles:
            key = layout.bundle_key(bundle.digest)
            if bundle.digest in named:
                spared.append((bundle.digest, "a ref names it now"))
                continue
            info = store.head(key)
            if info is None:
                continue
            if info.modified is None or _age(clock(), info.modified) <= the_plan.policy.grace:
                spared.append((bundle.digest, "rewritten within the grace period"))
                continue
            store.delete(key)
            deleted_bundles.append(bundle.digest)
            log.info("gc: deleted bundle %s (%d bytes)", bundle.digest, bundle.size)
    for name, why in spared:
        log.info("gc: kept %s after all: %s", name, why)
    return Outcome(tuple(deleted_refs), tuple(deleted_bundles), tuple(spared))


def _ts(when: dt.datetime | None) -> float:
    return when.timestamp() if when is not None else float("inf")  # undated: treat as newest


def _age(now: dt.datetime, when: dt.datetime) -> float:
    return (now - when).total_seconds()


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when is not None else None


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
