"""Refs: mutable, human-named pointers (``v1/refs/<name>.json``) to immutable bundles.

A ref records the digest, the compressed size, the producer facts and a monotonic ``version``
(the write time in nanoseconds, raised past any version already in the store), and, when signing
is configured (``BUNDLER_SIGNING_KEY``, ``BUNDLER_SIGNING_KEY_FILE``, ``BUNDLER_TRUSTED_KEYS``), a
signature over all of that and the ref's name (``bundler.remote.signing``). Signing the ref is
enough to protect everything behind it: the digest pins the manifest, and the manifest pins every
byte. A reader holding a key rejects unsigned or wrongly signed refs, because whoever can write to
the bucket could otherwise run code on every node that pulls (DESIGN.md, threat model).

A valid signature alone does not stop a *replay*: someone who can write the bucket could put back
an older signed ref, pointing at a bundle with a known bug. So a reader with signing configured
remembers, per store and ref name, the highest version it accepted (a small file under
``<cache_dir>/refs-seen/``) and refuses older ones; ``BUNDLER_REF_MAX_AGE`` bounds how old a ref a
node that has seen none may accept. docs/signing.md states what this does and does not cover.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bundler import logs
from bundler.config import Settings
from bundler.errors import BundleError, ConfigError, IntegrityError, NotFoundError, SignatureError
from bundler.fileio import write_atomically
from bundler.remote import layout, signing
from bundler.stores.base import Store

log = logging.getLogger(__name__)

#: The signed document kind of a ref (see ``bundler.remote.signing``).
KIND = "ref"
#: Producer facts ``bundle.<layer>`` name other bundles the ref's bundle needs (see linked_bundles).
LINKED_FACT = "bundle."


def linked_bundles(extra: Any, producer: Any) -> dict[str, str]:
    """Bundles a ref needs besides its own, by layer: ``{"pch": digest}`` for a torch ref, whose
    precompiled headers travel as a bundle of their own.

    Named twice: in the ref's ``extra.bundles`` (``{layer: {"digest", "size", "files"}}``), and
    as producer facts ``bundle.<layer>`` inside the bundle's own manifest, which an offline
    ``bundler import`` carries into the ref it writes (it has no ``extra`` to copy). Malformed
    entries are left out, unverified digests are only ever used as object names.
    """
    found: dict[str, str] = {}
    if isinstance(producer, Mapping):
        for key, value in producer.items():
            if isinstance(key, str) and key.startswith(LINKED_FACT) and isinstance(value, str):
                found[key[len(LINKED_FACT):]] = value
    bundles = extra.get("bundles") if isinstance(extra, Mapping) else None
    if isinstance(bundles, Mapping):
        for layer, entry in bundles.items():
            if isinstance(layer, str) and isinstance(entry, Mapping) and isinstance(entry.get("digest"), str):
                found[layer] = entry["digest"]
    out = {}
    for layer, digest in found.items():
        try:
            out[layer] = layout.check_digest(digest)
        except ConfigError:
            log.warning("a ref names a %s bundle with a malformed digest %r; ignoring it", layer, digest[:80])
    return out


@dataclasses.dataclass(frozen=True)
class Ref:
    name: str
    digest: str
    size: int
    created: str
    producer: Mapping[str, str] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    signature: str | None = None
    #: Monotonic per ref name: nanoseconds since the epoch at write time, or one past the version
    #: the store held, whichever is larger. 0 for refs written before versions existed.
    version: int = 0
    #: The signing scope the writer named (``BUNDLER_SIGNING_SCOPE``); "" when it named none.
    scope: str = ""

    def body(self) -> dict[str, Any]:
        """Everything the signature covers (with the name, given to the signer separately).

        ``scope`` only when set: refs signed without one keep the exact bytes they were signed over.
        """
        body = {
            "name": self.name,
            "digest": self.digest,
            "size": self.size,
            "created": self.created,
            "version": self.version,
            "producer": dict(self.producer),
            "extra": dict(self.extra),
        }
        if self.scope:
            body["scope"] = self.scope
        return body


_last_version = 0
_version_lock = threading.Lock()


def _next_version(floor: int) -> int:
    """A version above ``floor`` and above every one this process issued: two writes in the same
    nanosecond, or a writer whose clock is behind the last writer's, still move forward."""
    global _last_version
    with _version_lock:
        _last_version = max(time.time_ns(), floor + 1, _last_version + 1)
        return _last_version


def write_ref(
    store: Store,
    name: str,
    digest: str,
    size: int,
    *,
    producer: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> Ref:
    """Point ``name`` at a bundle (last writer wins: refs are mutable by design).

    With signing configured this reads the current ref first, so the new version is above the
    stored one even when this writer's clock is behind the last writer's (readers would refuse a
    lower one as a replay). Raises ConfigError when signing is configured but this process holds
    only public keys.
    """
    settings = settings or Settings.from_env()
    name = layout.check_name(name)
    keys = signing.keyring(settings)
    floor = 0
    if keys.enabled:
        keys.require_signer()
        floor = _stored_version(store, name, settings)
    ref = Ref(
        name=name,
        digest=layout.check_digest(digest),
        size=size,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        producer=dict(producer or {}),
        extra=dict(extra or {}),
        version=_next_version(floor),
        scope=settings.signing_scope,
    )
    doc = ref.body()
    if keys.enabled:
        doc["signature"] = keys.sign(KIND, name, ref.body())
    store.write_bytes(layout.ref_key(name), json.dumps(doc, sort_keys=True, indent=1).encode())
    return dataclasses.replace(ref, signature=doc.get("signature"))


def _stored_version(store: Store, name: str, settings: Settings) -> int:
    """The version of the validly signed ref now in the store, else 0 (missing, foreign, forged).

    Only a verified version counts: a forged ref with a huge version must not push ours there.
    """
    try:
        ref = _parse(store, name, store.read_bytes(layout.ref_key(name)))
    except (NotFoundError, BundleError):
        return 0
    return ref.version if signing.keyring(settings).verify(KIND, name, ref.body(), ref.signature) else 0


def read_ref(store: Store, name: str, settings: Settings | None = None) -> Ref:
    """Fetch and check a ref; raises NotFoundError on a miss, BundleError if it is malformed,
    SignatureError if signing is configured and it is unsigned, wrongly signed, older than one
    this node already accepted, or older than ``BUNDLER_REF_MAX_AGE``."""
    settings = settings or Settings.from_env()
    ref = _parse(store, name, store.read_bytes(layout.ref_key(name)))
    key = layout.ref_key(name)
    if ref.name != name:
        raise SignatureError(f"ref {key} in {store.url} names {ref.name!r}, not {name!r}: it was copied or tampered with")
    keys = signing.keyring(settings)
    problem = keys.problem(KIND, name, ref.body(), ref.signature)
    if problem is not None:
        raise SignatureError(f"ref {key} in {store.url} {problem}. It is refused because signing is configured "
                             "here; push it again from a producer that holds a trusted key")
    if settings.signing_scope and ref.scope != settings.signing_scope:
        raise SignatureError(
            f"ref {key} in {store.url} is signed for scope {ref.scope or '(none)'!r}, not "
            f"{settings.signing_scope!r} (BUNDLER_SIGNING_SCOPE): it was copied here from another store or "
            "prefix signed with the same key. Push it again from this scope's producer"
        )
    _check_age(ref, key, store, settings)
    if keys.enabled:
        _check_not_replayed(ref, key, store, settings)
    return ref


#: Refs are flat (``extra`` holds a few plain mappings); a document nested this deep is built to
#: break whatever encodes it again (the signature check re-encodes the body one level deeper).
_MAX_DEPTH = 32


def _too_deep(doc: object) -> bool:
    pending = [(doc, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > _MAX_DEPTH:
            return True
        if isinstance(value, dict):
            pending.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            pending.extend((v, depth + 1) for v in value)
    return False


def _parse(store: Store, name: str, raw: bytes) -> Ref:
    key = layout.ref_key(name)
    try:
        doc = json.loads(raw)
        if _too_deep(doc):
            raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
        ref = Ref(
            name=doc["name"],
            digest=layout.check_digest(doc["digest"]),
            size=int(doc["size"]),
            created=str(doc["created"]),
            producer=dict(doc.get("producer", {})),
            extra=dict(doc.get("extra", {})),
            signature=doc.get("signature"),
            version=doc.get("version", 0),
            scope=doc.get("scope", ""),
        )
        if not isinstance(ref.scope, str):
            raise TypeError("scope must be a string")
        if not isinstance(ref.signature, str | None) or not all(
            isinstance(v, str) for v in ref.producer.values()
        ):
            raise TypeError("signature and producer facts must be strings")
        if type(ref.version) is not int or not 0 <= ref.version < 1 << 63:
            raise TypeError(f"version {ref.version!r} is not a non-negative 64-bit integer")
    except ConfigError as exc:  # a digest that is not one: the ref was damaged or tampered with
        raise IntegrityError(
            f"ref {key} in {store.url} names no valid bundle digest ({exc}); push the bundle again to rewrite it"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise BundleError(f"ref {key} in {store.url} is malformed ({exc}); push the bundle again to rewrite it") from None
    return ref


def _check_age(ref: Ref, key: str, store: Store, settings: Settings) -> None:
    if settings.ref_max_age is None:
        return
    age = (time.time_ns() - ref.version) / 1e9
    if age > settings.ref_max_age:
        raise SignatureError(
            f"ref {key} in {store.url} was written {age:.0f} s ago (version {ref.version}), more than "
            f"BUNDLER_REF_MAX_AGE={settings.ref_max_age:g} allows: it may be an old ref put back. Push the "
            "ref again to refresh it, or raise BUNDLER_REF_MAX_AGE"
        )


def seen_path(store: Store, name: str, settings: Settings) -> Path:
    """Where this node keeps the highest version of ref ``name`` in ``store`` it has accepted."""
    ident = hashlib.sha256(f"{store.url}\0{name}".encode()).hexdigest()
    return settings.cache_dir / "refs-seen" / ident


#: How far below the highest version a node accepted a ref may be and still count as current.
#: Two producers pushing one ref at once each read the stored version, pick theirs, then PUT: the
#: one that picked first can land last (a retried PUT, a clock a little behind), leaving a slightly
#: lower version as the ref everyone now reads. Without this slack, every node that read the other
#: one in between would refuse the final ref as a replay and run cold, while fresh nodes accept it.
#: A replay inside the window can only swap between refs signed within minutes of each other.
CONCURRENT_WRITE_SLACK_NS = 300 * 10**9


def _check_not_replayed(ref: Ref, key: str, store: Store, settings: Settings) -> None:
    """Refuse a version more than :data:`CONCURRENT_WRITE_SLACK_NS` below the highest one accepted
    here before; remember a higher one.

    Read, compare, write without a lock: two processes racing can at worst store the lower of two
    versions both just accepted, which weakens the check for one ref until the next read; a lock
    would add a file and a stall to every pull for that. A file that cannot be read or written
    costs the check, not the pull (one warning): the cache must not become a dependency.
    """
    path = seen_path(store, ref.name, settings)
    seen = _read_seen(path)
    if ref.version < seen - CONCURRENT_WRITE_SLACK_NS:
        raise SignatureError(
            f"ref {key} in {store.url} has version {ref.version}, older than version {seen} already accepted "
            f"on this node: an older signed ref was put back (a replay, or a rollback by copying an old file). "
            f"To roll back on purpose, push the old bundle to the ref again (that gives it a new version); to "
            f"make this node forget, delete {path}"
        )
    if ref.version > seen:
        try:
            write_atomically(path, str(ref.version).encode())
        except OSError as exc:
            log.warning("refs: cannot record ref %s version in %s (%s); replays of it go unnoticed on this node",
                        ref.name, path, logs.one_line(exc))


def _read_seen(path: Path) -> int:
    try:
        return int(path.read_bytes().strip() or 0)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.warning("refs: cannot read %s (%s); treating the ref as never seen", path, logs.one_line(exc))
        return 0
