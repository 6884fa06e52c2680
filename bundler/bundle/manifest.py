"""MANIFEST.json: what a bundle promises, and the digest that names it.

The manifest is the bundle's table of contents and its identity at once: every file's relative
path, size and sha256, plus the producer's facts. Its canonical encoding (sorted keys, no spaces,
files sorted by path) is hashed to give the bundle digest, so a reader holding only a digest can
verify the manifest, and through it every byte it extracts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from typing import Any

from bundler.errors import ConfigError, LimitExceededError, ManifestError, UnsafeMemberError

_HEX = frozenset("0123456789abcdef")

FORMAT_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
_MAX_PATH = 4096
_MAX_COMPONENT = 255


@dataclasses.dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A bundle's contents; ``digest`` is the sha256 of ``encode()``."""

    files: tuple[FileRecord, ...]
    producer: Mapping[str, str] = dataclasses.field(default_factory=dict)
    format: int = FORMAT_VERSION

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def encode(self) -> bytes:
        """The canonical bytes: the same files and producer always give the same bytes."""
        doc = {
            "format": self.format,
            "producer": dict(sorted(self.producer.items())),
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "format": self.format,
            "files": len(self.files),
            "total_size": self.total_size,
            "producer": dict(self.producer),
        }


def build(records: Iterable[FileRecord], producer: Mapping[str, str] | None = None) -> Manifest:
    files = tuple(sorted(records, key=lambda r: r.path))
    for record in files:
        check_path(record.path)
    _check_unique(files)
    return Manifest(files=files, producer=dict(producer or {}))


def check_path(path: str) -> str:
    """Reject any member name that could land outside the destination or confuse a filesystem.

    The rules are stricter than tar's on purpose: a bundle only ever holds plain relative paths,
    so anything else is either a bug or an attack, and both should stop here with the name shown.
    """
    problem = None
    if not path:
        problem = "is empty"
    elif "\x00" in path:
        problem = "contains a NUL byte"
    elif path.startswith("/"):
        problem = "is absolute"
    elif "\\" in path:
        problem = "contains a backslash"
    elif len(path.encode("utf-8", "surrogateescape")) > _MAX_PATH:
        problem = f"is longer than {_MAX_PATH} bytes"
    else:
        for part in path.split("/"):
            if part in ("", ".", ".."):
                problem = f"has a {part or 'empty'!r} component" if part else "has an empty component"
                break
            if len(part.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT:
                problem = f"has a component longer than {_MAX_COMPONENT} bytes"
                break
    if problem is None and path == MANIFEST_NAME:
        problem = "is reserved for the bundle manifest"
    if problem:
        raise UnsafeMemberError(f"member {path!r} {problem}; bundles hold plain relative paths only")
    return path


def _check_unique(files: tuple[FileRecord, ...]) -> None:
    """No path twice, and no path that is both a file and a folder (``a`` and ``a/b``).

    The second would make unpacking fail half-way. Duplicates sit side by side in sorted order,
    but a file and its would-be folder need not (``a``, ``a-b``, ``a/b``: '-' sorts before '/'),
    so every folder on every path is looked up among the files.
    """
    for before, after in itertools.pairwise(files):
        if before.path == after.path:
            raise ManifestError(f"manifest lists {after.path!r} twice")
    paths = {record.path for record in files}
    folders_seen: set[str] = set()
    for record in files:
        folder = record.path.rpartition("/")[0]
        while folder and folder not in folders_seen:
            if folder in paths:
                raise UnsafeMemberError(f"{folder!r} is both a file and a folder (it holds {record.path!r})")
            folders_seen.add(folder)
            folder = folder.rpartition("/")[0]


def check_digest(digest: str) -> str:
    """A bundle digest is the manifest's sha256 in lowercase hex."""
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in _HEX for c in digest)):
        raise ConfigError(f"{digest!r} is not a bundle digest: expected 64 lowercase hex characters")
    return digest


def decode(data: bytes, *, max_members: int) -> Manifest:
    """Parse and validate manifest bytes; the caller checks the digest of ``data`` separately."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{MANIFEST_NAME} must be a JSON object")
    version = doc.get("format")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{MANIFEST_NAME} has format {version!r}; this kernel-bundler reads format {FORMAT_VERSION}. "
            "Upgrade kernel-bundler, or re-pack the cache with this version"
        )
    files = doc.get("files")
    producer = doc.get("producer", {})
    if not isinstance(files, list) or not isinstance(producer, dict):
        raise ManifestError(f"{MANIFEST_NAME} needs a 'files' list and a 'producer' object")
    if len(files) > max_members:
        raise LimitExceededError(
            f"the bundle has {len(files)} members, more than the limit of {max_members}; "
            "raise BUNDLER_MAX_MEMBERS if the bundle is trusted"
        )
    records = []
    for item in files:
        try:
            record = FileRecord(path=item["path"], size=item["size"], sha256=item["sha256"])
        except (TypeError, KeyError):
            raise ManifestError(f"{MANIFEST_NAME} has a malformed file entry: {item!r:.200}") from None
        if not (
            isinstance(record.path, str)
            and type(record.size) is int
            and record.size >= 0
            and isinstance(record.sha256, str)
            and len(record.sha256) == 64
        ):
            raise ManifestError(f"{MANIFEST_NAME} has a malformed file entry: {item!r:.200}")
        check_path(record.path)
        records.append(record)
    manifest = Manifest(files=tuple(records), producer={str(k): str(v) for k, v in producer.items()})
    if [r.path for r in records] != sorted(r.path for r in records):
        raise ManifestError(
            f"{MANIFEST_NAME} files are not sorted by path; it was not written by kernel-bundler"
        )
    _check_unique(manifest.files)
    if manifest.encode() != data:
        # One file set must have one digest: extra keys, spacing or another key order would give
        # the same files a second name and defeat deduplication by digest.
        raise ManifestError(f"{MANIFEST_NAME} is not in canonical form; it was not written by kernel-bundler")
    return manifest
