"""Housekeeping for a store: plan what to delete, show it, then delete it (``bundler gc``).

Two steps, as in huggingface_hub's cache cleaning: :func:`plan` is a pure function over listings
(it is what the tests pin down and what a dry run prints), :func:`execute` carries a plan out
against the live store, re-checking what may have changed since the listing.

What goes, in this order:

1. Refs, by retention: refs are grouped by *prefix* (the part of the name before the last ``/``;
   ``llama/h100`` and ``llama/a100`` share ``llama``, a name without ``/`` is in the group ``""``).
   ``keep_last`` keeps the newest N of each group and deletes the rest; ``older_than`` deletes
   refs not written for that long. ``keep_last`` is a floor: the newest N of each group are kept
   whatever their age, so ``--keep-last 5 --older-than 30d`` never empties a prefix whose jobs
   have been idle for a month (the ref they read is among its newest).
2. Bundles that no remaining ref names *and* that are older than ``grace``. The grace period is
   what keeps a push in flight safe: a push uploads its bundle first and writes its ref after, so
   for a moment a new bundle is unreferenced. A push that finds its bundle already stored (and
   older than ``transfer.REFRESH_AFTER_S``) rewrites it, which makes it new again; one that finds
   it younger leaves it as it is. So ``grace`` must be longer than that window (:class:`Policy`
   refuses less), or gc could delete a bundle a ref was just pointed at.
3. With ``bundler gc``, on S3: multipart uploads that killed pushes left behind
   (:func:`stale_uploads`), never younger than an hour.

What :func:`execute` re-checks, because the store keeps changing while gc runs: a ref is deleted
only if it still holds what the plan saw (a push that moved it meanwhile keeps it); before any
bundle is deleted the refs are listed and read again (and again every :data:`REREAD_EVERY` bundles
or :data:`REREAD_AFTER_S` seconds of a long delete loop), and a bundle a ref now names is kept, as
is one whose date moved into the grace period. S3 has no conditional delete, so a ref rewritten in
the instant between the re-read and the delete can still be lost; the grace period makes that
window a single request wide, and the next push repairs it.

Refs are read raw (digest only, no signature check): gc must keep the bundle of a ref it could not
verify, never delete it because it could not. An object under ``v1/refs/`` that is no usable ref
(a name no ref may have, over the size limit, not a ref document) is an *odd ref*: gc warns, shows
it in the plan with what to do, keeps any bundle it names and deletes nothing of it, and goes on.
A ref the store fails to read (unreachable, denied) is no odd ref: gc stops before deleting
anything, since it would otherwise act on incomplete knowledge.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from bundler.errors import (
    ConfigError,
    LimitExceededError,
    NotFoundError,
    NotFoundOrDeniedError,
    StoreError,
)
from bundler.remote import layout
from bundler.remote.refs import linked_bundles
from bundler.remote.transfer import REFRESH_AFTER_S
from bundler.stores.base import SMALL_OBJECT_LIMIT, ObjectInfo, Store

log = logging.getLogger(__name__)

#: The default grace period for unreferenced bundles: far above any push's upload-to-ref time.
DEFAULT_GRACE_S = 3600.0
#: A long delete loop re-reads the refs after this many bundles or seconds, whichever comes first,
#: so a ref written meanwhile keeps its bundle (a full re-read per bundle would cost a listing and
#: a GET per ref for every delete).
REREAD_EVERY = 200
REREAD_AFTER_S = 30.0
#: gc never aborts a multipart upload younger than this, whatever ``grace`` says: a live push of a
#: large bundle takes minutes, and aborting it would fail that push.
MIN_UPLOAD_AGE_S = 3600.0

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
    problem: str | None = None  # set for an odd ref: what is wrong and what to do; gc never deletes it

    @property
    def digests(self) -> set[str]:
        return ({self.digest} if self.digest else set()) | set(self.also)

    @property
    def key(self) -> str:
        return f"{layout.REFS}{self.name}{layout.JSON_SUFFIX}"

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
    """Retention: the newest ``keep_last`` refs per prefix stay (whatever their age), other refs
    ``older_than`` seconds go, unnamed bundles after ``grace``."""

    keep_last: int | None = None
    older_than: float | None = None
    grace: float = DEFAULT_GRACE_S

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"--keep-last {self.keep_last}: keep at least 1 ref per prefix (or leave it out)")
        if self.grace < 0 or (self.older_than is not None and self.older_than < 0):
            raise ConfigError("durations must not be negative")
        if self.grace <= REFRESH_AFTER_S:
            raise ConfigError(
                f"a gc grace period (--grace) of {_human(self.grace)} is too short: it must be longer than "
                f"{_human(REFRESH_AFTER_S)}, because a push that finds its bundle stored and younger than that "
                "does not rewrite it, so gc could delete a bundle a ref was just pointed at; use at least 11m "
                "(the default is 1h)"
            )


@dataclasses.dataclass(frozen=True)
class Plan:
    """What gc would delete and why it keeps the rest; ``to_json()`` is what ``--json`` prints."""

    now: dt.datetime
    policy: Policy
    delete_refs: tuple[tuple[RefEntry, str], ...]
    keep_refs: tuple[RefEntry, ...]
    delete_bundles: tuple[BundleEntry, ...]
    keep_bundles: tuple[tuple[BundleEntry, str], ...]
    odd_refs: tuple[RefEntry, ...] = ()  # reported with what to do; never deleted, their bundles kept

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
            "odd_refs": [{"key": r.key, "digest": r.digest, "modified": _iso(r.modified), "problem": r.problem}
                         for r in self.odd_refs],
            "freed_bytes": self.freed_bytes,
        }


def plan(refs: Iterable[RefEntry], bundles: Iterable[BundleEntry], policy: Policy, now: dt.datetime) -> Plan:
    """Decide, from listings alone, which refs and bundles go (pure: no store, no clock)."""
    refs, bundles = list(refs), list(bundles)
    odd = tuple(r for r in refs if r.problem)
    refs = [r for r in refs if not r.problem]
    doomed: dict[str, str] = {}
    groups: dict[str, list[RefEntry]] = {}
    for ref in refs:
        groups.setdefault(ref.prefix, []).append(ref)
    floor: set[str] = set()  # the newest keep_last of each group: kept whatever their age
    for group in groups.values():
        newest_first = sorted(group, key=lambda r: (_ts(r.modified), r.name), reverse=True)
        if policy.keep_last is not None:
            floor.update(r.name for r in newest_first[: policy.keep_last])
            for ref in newest_first[policy.keep_last:]:
                doomed[ref.name] = f"beyond the newest {policy.keep_last} of prefix {ref.prefix or '(none)'!r}"
    if policy.older_than is not None:
        for ref in refs:
            if ref.name in floor:
                continue
            if ref.modified is not None and _age(now, ref.modified) > policy.older_than:
                doomed.setdefault(ref.name, f"not written for {_human(_age(now, ref.modified))}")
    delete_refs = tuple((r, doomed[r.name]) for r in refs if r.name in doomed)
    keep_refs = tuple(r for r in refs if r.name not in doomed)
    named = {digest for r in (*keep_refs, *odd) for digest in r.digests}
    delete_bundles: list[BundleEntry] = []
    keep_bundles: list[tuple[BundleEntry, str]] = []
    for bundle in bundles:
        if bundle.digest in named:
            keep_bundles.append((bundle, "named by a ref"))
        elif bundle.modified is None or _age(now, bundle.modified) <= policy.grace:
            keep_bundles.append((bundle, "within the grace period (a push may be in flight)"))
        else:
            delete_bundles.append(bundle)
    return Plan(now, policy, delete_refs, keep_refs, tuple(delete_bundles), tuple(keep_bundles), odd)


def gather(store: Store) -> tuple[list[RefEntry], list[BundleEntry]]:
    """List the store's refs (each read raw for its digest; odd ones warned about) and bundles.

    Raises the StoreError of a ref the store failed to read: planning on what is left would be
    planning on incomplete knowledge.
    """
    refs = list(_read_refs(store))
    for odd in (r for r in refs if r.problem):
        log.warning("gc: %s in %s is no usable ref: %s", odd.key, store.url, odd.problem)
    bundles = []
    for info in store.list(layout.BUNDLES):
        digest = layout.digest_from_bundle_key(info.key)
        if digest is not None:
            bundles.append(BundleEntry(digest, info.size, info.modified))
    return refs, bundles


def _read_refs(store: Store) -> Iterable[RefEntry]:
    for info in store.list(layout.REFS):
        name = layout.ref_name_from_key(info.key)
        if name is not None:
            entry = _read_ref(store, info, name)
            if entry is not None:
                yield entry


def _read_ref(store: Store, info: ObjectInfo, name: str) -> RefEntry | None:
    """One listed ref, read raw; an odd one comes back with its ``problem``; None if deleted meanwhile."""
    try:
        raw = store.read_bytes(info.key)
    except NotFoundOrDeniedError as exc:  # just listed, so not missing: these credentials may not read it
        raise StoreError(
            f"gc cannot read ref {info.key} in {store.url}, which it has just listed ({exc}); gc deletes "
            "nothing while it cannot read every ref: allow s3:GetObject on the refs for these credentials"
        ) from exc
    except NotFoundError:
        return None  # deleted since the listing
    except LimitExceededError:
        return RefEntry(name, None, info.modified, problem=(
            f"over {SMALL_OBJECT_LIMIT} bytes, so not a ref kernel-bundler wrote; delete it"))
    except ConfigError as exc:  # a name this store cannot address (a local folder's key rules)
        return RefEntry(name, None, info.modified, problem=f"{exc}; delete it with your storage tools")
    doc = _document(raw)
    entry = RefEntry(name, _digest_of(doc), info.modified, hashlib.sha256(raw).hexdigest(), _also_of(doc))
    try:
        layout.check_name(name)
    except ConfigError as exc:
        return dataclasses.replace(entry, problem=(
            f"{exc}; delete it with your storage tools (bundler rm cannot name it), and push again under a "
            "valid name if it is needed; gc keeps the bundle it names meanwhile"))
    if entry.digest is None:
        return dataclasses.replace(entry, problem=(
            f"not a ref document (no JSON object naming a bundle digest); delete it (bundler rm {name}) or "
            f"push again to rewrite it (bundler push DIR --ref {name})"))
    return entry


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
        named = _NamedNow(store)
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


class _NamedNow:
    """The digests the store's refs name, read now and again every :data:`REREAD_EVERY` lookups or
    :data:`REREAD_AFTER_S` seconds, so a ref written during a long delete loop keeps its bundle."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._read()

    def _read(self) -> None:
        self._digests = {digest for r in _read_refs(self._store) for digest in r.digests}
        self._lookups = 0
        self._since = time.monotonic()

    def __contains__(self, digest: str) -> bool:
        if self._lookups >= REREAD_EVERY or time.monotonic() - self._since >= REREAD_AFTER_S:
            self._read()
        self._lookups += 1
        return digest in self._digests


@dataclasses.dataclass(frozen=True)
class StaleUploads:
    """Multipart uploads older than ``older_than`` seconds: aborted, or (dry run) what would be."""

    older_than: float
    keys: tuple[str, ...]
    aborted: bool
    error: str | None = None  # why they could not be listed or aborted; gc itself still succeeded

    def to_json(self) -> dict[str, Any]:
        return {"older_than_s": self.older_than, "keys": list(self.keys), "aborted": self.aborted,
                "error": self.error}


def stale_uploads(store: Store, policy: Policy, *, abort: bool) -> StaleUploads | None:
    """Abort (or, unless ``abort``, only list) multipart uploads that killed pushes left behind.

    Why here: their parts are billed but invisible to listings, so nothing else ever removes them
    where the bucket has no ``AbortIncompleteMultipartUpload`` lifecycle rule. Only uploads older
    than ``max(grace, MIN_UPLOAD_AGE_S)`` go, so a live push is never cut off. None: the store has
    no multipart uploads (a folder). A failure (say, no s3:ListBucketMultipartUploads) is logged
    and reported, not raised: the refs and bundles gc came for are done either way.
    """
    method = getattr(store, "abort_stale_uploads", None)
    if method is None:
        return None
    age = max(policy.grace, MIN_UPLOAD_AGE_S)
    try:
        keys = method(age, dry_run=not abort)
    except StoreError as exc:
        log.warning("gc: could not %s stale multipart uploads in %s: %s; allow s3:ListBucketMultipartUploads "
                    "and s3:AbortMultipartUpload, or add an AbortIncompleteMultipartUpload lifecycle rule",
                    "abort" if abort else "list", store.url, exc)
        return StaleUploads(age, (), abort, str(exc).splitlines()[0])
    return StaleUploads(age, tuple(keys), abort)


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
