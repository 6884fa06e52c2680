"""Every object key kernel-bundler writes, named in one place (DESIGN.md, "Object layout").

Keys are relative to the store root (the ``prefix`` of ``s3://bucket/prefix``). Names that come
from users (ref names, autotune keys) are validated here so that no caller can build a key that
escapes its folder or collides with another kind of object.
"""

from __future__ import annotations

import re

from bundler.bundle.manifest import check_digest
from bundler.errors import ConfigError

__all__ = ["check_digest", "check_name", "bundle_key", "ref_key", "autotune_key"]

LAYOUT_VERSION = "v1"
BUNDLES = f"{LAYOUT_VERSION}/bundles/"
REFS = f"{LAYOUT_VERSION}/refs/"
AUTOTUNE = f"{LAYOUT_VERSION}/autotune/"
BUNDLE_SUFFIX = ".tar.zst"
JSON_SUFFIX = ".json"

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Ref names may group with '/', like git refs; each segment is a conservative file-name charset.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@-]{0,199}(/[A-Za-z0-9_][A-Za-z0-9._+=@-]{0,199}){0,15}$")




def check_name(name: str, what: str = "ref name") -> str:
    if not _NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{name!r} is not a valid {what}: use letters, digits and . _ + = @ -, "
            "optionally grouped with '/', no '..'"
        )
    return name


def bundle_key(digest: str) -> str:
    return f"{BUNDLES}{check_digest(digest)}{BUNDLE_SUFFIX}"


def ref_key(name: str) -> str:
    return f"{REFS}{check_name(name)}{JSON_SUFFIX}"


def autotune_key(key: str) -> str:
    return f"{AUTOTUNE}{check_name(key, 'autotune key')}{JSON_SUFFIX}"


def digest_from_bundle_key(key: str) -> str | None:
    """The digest of a bundle key from a listing, or None for anything else under bundles/."""
    if not (key.startswith(BUNDLES) and key.endswith(BUNDLE_SUFFIX)):
        return None
    digest = key[len(BUNDLES) : -len(BUNDLE_SUFFIX)]
    return digest if _DIGEST.match(digest) else None


def ref_name_from_key(key: str) -> str | None:
    if not (key.startswith(REFS) and key.endswith(JSON_SUFFIX)):
        return None
    return key[len(REFS) : -len(JSON_SUFFIX)]
