"""Refs: mutable, human-named pointers (``v1/refs/<name>.json``) to immutable bundles.

A ref records the digest, the compressed size and the producer facts, and, when a signing key is
configured (``BUNDLER_SIGNING_KEY``), an HMAC-SHA256 over all of that. Signing the ref is enough
to protect everything behind it: the digest pins the manifest, and the manifest pins every byte.
A reader holding a key rejects unsigned or wrongly signed refs, because whoever can write to the
bucket could otherwise run code on every node that pulls (DESIGN.md, threat model).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import json
from collections.abc import Mapping
from typing import Any

from bundler.config import Settings
from bundler.errors import BundleError, SignatureError
from bundler.remote import layout
from bundler.remote.signing import sign as _sign
from bundler.stores.base import Store


@dataclasses.dataclass(frozen=True)
class Ref:
    name: str
    digest: str
    size: int
    created: str
    producer: Mapping[str, str] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    signature: str | None = None

    def body(self) -> dict[str, Any]:
        """Everything the signature covers (the name too, so a ref cannot be copied to another)."""
        return {
            "name": self.name,
            "digest": self.digest,
            "size": self.size,
            "created": self.created,
            "producer": dict(self.producer),
            "extra": dict(self.extra),
        }


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
    """Point ``name`` at a bundle (last writer wins: refs are mutable by design)."""
    settings = settings or Settings.from_env()
    ref = Ref(
        name=layout.check_name(name),
        digest=layout.check_digest(digest),
        size=size,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        producer=dict(producer or {}),
        extra=dict(extra or {}),
    )
    doc = ref.body()
    if settings.signing_key:
        doc["signature"] = _sign(ref.body(), settings.signing_key)
    store.write_bytes(layout.ref_key(name), json.dumps(doc, sort_keys=True, indent=1).encode())
    return dataclasses.replace(ref, signature=doc.get("signature"))


def read_ref(store: Store, name: str, settings: Settings | None = None) -> Ref:
    """Fetch and check a ref; raises NotFoundError on a miss, BundleError if it is malformed."""
    settings = settings or Settings.from_env()
    key = layout.ref_key(name)
    raw = store.read_bytes(key)
    try:
        doc = json.loads(raw)
        ref = Ref(
            name=doc["name"],
            digest=layout.check_digest(doc["digest"]),
            size=int(doc["size"]),
            created=str(doc["created"]),
            producer=dict(doc.get("producer", {})),
            extra=dict(doc.get("extra", {})),
            signature=doc.get("signature"),
        )
        if not isinstance(ref.signature, str | None) or not all(
            isinstance(v, str) for v in ref.producer.values()
        ):
            raise TypeError("signature and producer facts must be strings")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"ref {key} in {store.url} is malformed ({exc}); push the bundle again to rewrite it") from None
    if ref.name != name:
        raise SignatureError(f"ref {key} in {store.url} names {ref.name!r}, not {name!r}: it was copied or tampered with")
    if settings.signing_key:
        _check_signature(ref, key, store, settings.signing_key)
    return ref


def _check_signature(ref: Ref, key: str, store: Store, signing_key: str) -> None:
    if not ref.signature:
        raise SignatureError(
            f"ref {key} in {store.url} is unsigned, and BUNDLER_SIGNING_KEY is set: refusing it. "
            "Push it again from a producer that has the key"
        )
    if not hmac.compare_digest(ref.signature.encode(), _sign(ref.body(), signing_key).encode()):
        raise SignatureError(
            f"ref {key} in {store.url} has a wrong signature: it was tampered with or signed with another key"
        )
