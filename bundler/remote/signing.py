"""HMAC-SHA256 signatures over JSON documents: refs and per-kernel autotune records.

Whoever can write to the bucket can run code on every node that pulls from it (DESIGN.md, threat
model), so a reader configured with ``BUNDLER_SIGNING_KEY`` trusts only documents signed with that
key. One canonical JSON form (sorted keys, no whitespace) is signed, so a signature does not depend
on how the writer laid the document out. The body must name the object it describes (a ref's name,
an autotune record's key), or a signed document could be copied under another name and still pass.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

SIGNATURE_PREFIX = "hmac-sha256:"


def sign(body: Mapping[str, Any], key: str) -> str:
    """The signature of ``body`` (JSON-able) under the shared secret ``key``."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return SIGNATURE_PREFIX + hmac.new(key.encode(), canonical, hashlib.sha256).hexdigest()


def verify(body: Mapping[str, Any], signature: object, key: str) -> bool:
    """True when ``signature`` is ``body``'s signature under ``key`` (constant-time comparison)."""
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(body, key))
