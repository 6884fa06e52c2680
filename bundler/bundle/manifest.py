"""MANIFEST.json: what a bundle promises, and the digest that names it.

The manifest is the bundle's table of contents and its identity at once: every file's relative
path, size and sha256, plus the producer's facts. Its canonical encoding (sorted keys, no spaces,
files sorted by path) is hashed to give the bundle digest, so a reader holding only a digest can
verify the manifest, and through it every byte it extracts.

The order of the members in the tar stream is a pure function of the manifest,
:func:`stream_order`: path order in format 1, extension then path from format 2 on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from bundler.errors import ConfigError, LimitExceededError, ManifestError, UnsafeMemberError
from bundler.frozen import Frozen

if TYPE_CHECKING:  # pragma: no cover
    from bundler.config import Settings

_HEX = frozenset("0123456789abcdef")

#: The bundle format this kernel-bundler writes (the manifest's "format"), and the oldest it reads.
#: Both are read; anything else is refused before a single member is read.
#:
#: * 1: members in the tar in manifest (path) order.
#: * 2: members in :func:`stream_order`: by extension, then path. The manifest is unchanged.
FORMAT_VERSION = 2
OLDEST_FORMAT = 1
MANIFEST_NAME = "MANIFEST.json"
#: Path limits every member obeys, checked by pack and unpack alike (:func:`check_path`), so a
#: bundle that packs also places. Linux refuses paths over 4096 bytes (PATH_MAX) and components
#: over 255 (NAME_MAX); the member path must leave room for the destination and its staging
#: folder in front, hence 1024. Real caches nest 2-6 folders deep; 32 bounds the folders an
#: unpack creates per file, and with them the work a hostile name can cause.
_MAX_PATH = 1024
_MAX_COMPONENT = 255
_MAX_DEPTH = 32
#: Numbers in a manifest are sizes and the format version: 20 digits hold any 64-bit size, and
#: Python's int() of a many-thousand-digit string is slow and then refused with a ValueError.
_MAX_NUMBER_DIGITS = 20
#: JSON values a manifest of n bytes may hold: n // 8 plus slack for producer facts. A real file
#: entry is ~90+ bytes for 6 such values; ``[[],[],...]`` or ``["a","a",...]`` is 3 bytes per value,
#: each costing 50-60 bytes parsed, so this caps parsed memory near 8x the manifest's size.
_BYTES_PER_VALUE = 8
_VALUE_SLACK = 4096
# Patterns, compiled by ``re`` on first use: only malformed or unusual manifests need them, and
# compiling both at import cost every command 0.3 ms.
#: A JSON string, or an unterminated one running to the end of the data (which ``json.loads``
#: refuses there, before it builds anything after it). Every ``"`` it is tried at matches, with
#: possessive quantifiers and ``.`` taking newlines, so ``re.sub`` is one linear pass: a pattern
#: that can fail, such as ``"[^"\\]*(?:\\.[^"\\]*)*"``, scans to the end from each ``"`` of an
#: unterminated string of escaped quotes (``"\\",\\",...``), quadratic in the manifest's size.
_STRING = rb'(?s)"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)'
_SHA256 = r"[0-9a-f]{64}"


class FileRecord(Frozen):
    """One member: its path in the bundle, size in bytes and sha256 (lowercase hex)."""

    _fields = ("path", "size", "sha256")
    path: str
    size: int
    sha256: str

    def __init__(self, path: str, size: int, sha256: str) -> None:
        # One C call for the three fields: a manifest makes one record per file.
        self.__dict__.update(path=path, size=size, sha256=sha256)


class Manifest(Frozen):
    """A bundle's contents; ``digest`` is the sha256 of ``encode()``."""

    _fields = ("files", "producer", "format")
    files: tuple[FileRecord, ...]
    producer: Mapping[str, str]
    format: int

    def __init__(
        self, files: tuple[FileRecord, ...], producer: Mapping[str, str] | None = None, format: int = FORMAT_VERSION
    ) -> None:
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "producer", {} if producer is None else producer)
        object.__setattr__(self, "format", format)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def encode(self) -> bytes:
        """The canonical bytes: the same files and producer always give the same bytes.

        Kept once computed (``decode`` computes them to check a manifest is canonical, and the
        digest needs them again: 4.5 ms for 1,600 files). ``files`` and the records are frozen;
        ``producer`` is a plain mapping, so the copy kept is checked against it on every use.
        """
        producer = dict(sorted(self.producer.items()))
        kept = self.__dict__.get("_encoded")
        if kept is not None and kept[0] == producer:
            return kept[1]  # type: ignore[no-any-return]
        files = _encode_files(self.files)
        if files is None:
            doc = {
                "format": self.format,
                "producer": producer,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            }
            data = _dumps(doc).encode()
        else:
            data = f'{{"files":[{files}],"format":{_dumps(self.format)},"producer":{_dumps(producer)}}}'.encode()
        self.__dict__["_encoded"] = (producer, data)
        return data

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


def _dumps(value: object) -> str:
    """The canonical JSON text of ``value``: sorted keys, no spaces, text as it is (UTF-8 later)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


#: One file entry exactly as ``_dumps`` writes it: keys in sorted order, strings already quoted.
_FILE_ENTRY = '{"path":%s,"sha256":%s,"size":%d}'


def _encode_files(files: tuple[FileRecord, ...]) -> str | None:
    """The entries of ``files`` as ``_dumps`` writes them, one string format per entry: 1.7 ms for
    1,600 files where building and dumping a dict per file took 2.5 or more (once in every pack,
    and in every unpack, which checks that the manifest it read is canonical). The strings go
    through the very function ``_dumps`` uses for them; None unless every field is of the exact
    type this is written for (an int subclass such as ``bool`` is written differently), so that
    ``_dumps`` writes those.
    """
    paths = [f.path for f in files]
    hashes = [f.sha256 for f in files]
    sizes = [f.size for f in files]
    if not (set(map(type, paths)) <= {str} and set(map(type, hashes)) <= {str} and set(map(type, sizes)) <= {int}):
        return None
    quote = json.encoder.encode_basestring
    return ",".join(map(_FILE_ENTRY.__mod__, zip(map(quote, paths), map(quote, hashes), sizes, strict=True)))


def extension(path: str) -> str:
    """The text after the last '.' of the final path component; '' when there is none, or when that
    '.' is the component's first character (a dot file: ``.lock`` is a name, not an extension).

    ``k/a.cubin`` -> ``cubin``, ``k/a.tar.gz`` -> ``gz``, ``fx/entry`` -> ``''``, ``k/.lock`` -> ``''``,
    ``k/.a.json`` -> ``json``, ``k/a.`` -> ``''``. Written out rather than taken from
    ``os.path.splitext`` because it is part of the format: it may never change with a library.
    """
    name = path.rpartition("/")[2]
    dot = name.rfind(".")
    return name[dot + 1 :] if dot > 0 else ""


def stream_key(path: str) -> tuple[str, str]:
    """Where a member goes in a format-2 tar stream: by extension, then path (code point order).

    Files of one kind sit together, as in 7-Zip's solid archives, so the near-copies an autotuned
    cache is made of (180 cubins of a few templates, and the extension-less FX-graph pickle that
    embeds them) fall within zstd's 16 MiB window of each other, where path order scatters them
    over 70 MB of kernel folders. Unique per path, so the order is total.
    """
    return extension(path), path


def stream_order(man: Manifest) -> tuple[FileRecord, ...]:
    """The order the members of ``man``'s bundle follow in the tar: the writer's and the reader's."""
    if man.format == 1:
        return man.files
    return tuple(sorted(man.files, key=lambda record: stream_key(record.path)))


def build(records: Iterable[FileRecord], producer: Mapping[str, str] | None = None) -> Manifest:
    files = tuple(sorted(records, key=lambda r: r.path))
    for record in files:
        check_path(record.path)
    _check_unique(files)
    producer = dict(producer or {})
    for key, value in producer.items():
        if not (isinstance(key, str) and isinstance(value, str) and _is_unicode(key) and _is_unicode(value)):
            raise ManifestError(f"producer fact {key!r} = {value!r} must be a text string (no lone surrogates)")
    return Manifest(files=files, producer=producer)


def _is_unicode(text: str) -> bool:
    """True when ``text`` encodes as UTF-8: no lone surrogates (JSON's ``"\\ud800"``, or
    surrogate-escaped bytes of a file name that is not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(path: str) -> str:
    """A member name for an error message: a hostile name can be megabytes long."""
    return repr(path) if len(path) <= 200 else repr(path[:200]) + "..."


def check_fits(man: Manifest, encoded_size: int, settings: Settings) -> Manifest:
    """The limits a reader applies to a whole bundle; ``pack`` applies the same ones, so a bundle
    that packs with some settings also unpacks with them."""
    if len(man.files) > settings.max_members:
        raise LimitExceededError(
            f"the bundle has {len(man.files)} members, more than the limit of {settings.max_members}; "
            "raise BUNDLER_MAX_MEMBERS if the bundle is trusted"
        )
    if encoded_size > settings.max_manifest_bytes:
        raise LimitExceededError(
            f"{MANIFEST_NAME} is {encoded_size} bytes, over the limit of {settings.max_manifest_bytes}; "
            "raise BUNDLER_MAX_MANIFEST_BYTES if the bundle is trusted"
        )
    if man.total_size > settings.max_bundle_bytes:
        raise LimitExceededError(
            f"the bundle unpacks to {man.total_size} bytes, over the limit of {settings.max_bundle_bytes}; "
            "raise BUNDLER_MAX_BUNDLE_BYTES if it is trusted"
        )
    return man


def check_path(path: str) -> str:
    """Reject any member name that could land outside the destination or confuse a filesystem.

    The rules are stricter than tar's on purpose: a bundle only ever holds plain relative paths,
    so anything else is either a bug or an attack, and both should stop here with the name shown.
    """
    # The common case first, in C-speed string scans: a plain ASCII path (characters are bytes)
    # that passes every rule below. Anything else takes the steps below, which name the problem.
    if (
        type(path) is str
        and path.isascii()
        and 0 < len(path) <= _MAX_PATH
        and path.count("/") < _MAX_DEPTH
        and "\x00" not in path
        and "\\" not in path
        and "//" not in path
        and path[0] != "/"
        and path[-1] != "/"
        and "/./" not in (wrapped := f"/{path}/")
        and "/../" not in wrapped
        and (len(path) <= _MAX_COMPONENT or max(map(len, path.split("/"))) <= _MAX_COMPONENT)
        and path != MANIFEST_NAME
    ):
        return path
    problem = None
    encoded = path.encode("utf-8", "surrogatepass") if isinstance(path, str) else b""
    if not isinstance(path, str) or not path:
        problem = "is empty"
    elif not _is_unicode(path):
        problem = "is not valid UTF-8"
    elif "\x00" in path:
        problem = "contains a NUL byte"
    elif path.startswith("/"):
        problem = "is absolute"
    elif "\\" in path:
        problem = "contains a backslash"
    elif len(encoded) > _MAX_PATH:
        problem = f"is longer than {_MAX_PATH} bytes"
    elif path.count("/") >= _MAX_DEPTH:
        problem = f"is more than {_MAX_DEPTH} levels deep"
    else:
        for part in path.split("/"):
            if part in ("", ".", ".."):
                problem = f"has a {part!r} component" if part else "has an empty component"
                break
            if len(part.encode("utf-8")) > _MAX_COMPONENT:
                problem = f"has a component longer than {_MAX_COMPONENT} bytes"
                break
    if problem is None and path == MANIFEST_NAME:
        problem = "is reserved for the bundle manifest"
    if problem:
        raise UnsafeMemberError(f"member {_show(path)} {problem}; bundles hold plain relative paths only")
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


def _check_shape(data: bytes) -> None:
    """Refuse JSON whose parsed form would cost far more memory than real manifests of its size.

    Every JSON value but the first follows a ``[``, ``,`` or ``:``; counting those outside strings
    bounds the values ``json.loads`` would build. The raw count (strings included) is an upper
    bound, so the exact count, which copies the bytes without their strings, is only taken when
    the raw one is over the limit.
    """
    limit = len(data) // _BYTES_PER_VALUE + _VALUE_SLACK

    def values(text: bytes) -> int:
        return text.count(b"[") + text.count(b",") + text.count(b":")

    if values(data) > limit and values(re.sub(_STRING, b"", data)) > limit:
        raise ManifestError(
            f"{MANIFEST_NAME} holds far more JSON values than a manifest of {len(data)} bytes can; "
            "it was not written by kernel-bundler"
        )


def _number(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_NUMBER_DIGITS:
        raise ManifestError(f"{MANIFEST_NAME} holds a number of {len(text)} digits; sizes have at most 20")
    return int(text)


def _entry(item: object, index: int) -> FileRecord:
    """One ``files`` entry, checked field by field; the message never echoes a huge or deep value."""
    if not isinstance(item, dict):
        raise ManifestError(f"{MANIFEST_NAME} has a malformed file entry {index}: a {type(item).__name__}")
    path, size, sha256 = item.get("path"), item.get("size"), item.get("sha256")
    if not (
        isinstance(path, str)
        and type(size) is int
        and size >= 0
        and isinstance(sha256, str)
        and re.fullmatch(_SHA256, sha256)
    ):
        shown = {k: v if isinstance(v, int) else f"{type(v).__name__}" for k, v in item.items() if k != "path"}
        raise ManifestError(
            f"{MANIFEST_NAME} has a malformed file entry {index} "
            f"({_show(path) if isinstance(path, str) else 'no path'}, {shown!r:.200})"
        )
    check_path(path)
    return FileRecord(path, size, sha256)


def _records(files: list) -> list[FileRecord]:
    """The ``files`` entries as records: what :func:`_entry` on each gives, errors included.

    The entries of a manifest we wrote pass every check, so they are checked a field at a time
    for all entries at once, in C-speed set and string operations: 3.4 ms instead of 4.5 for
    1,600 files, in manifest decoding, which no file can be written before. Any doubt, and the
    entry-by-entry loop runs: it finds the first bad entry and words the error. Paths are
    checked last, in entry order, so the first one refused is the one the loop would refuse.
    """
    try:
        paths = [item["path"] for item in files]
        sizes = [item["size"] for item in files]
        hashes = [item["sha256"] for item in files]
    except (KeyError, TypeError):  # an entry that is not an object, or lacks a field
        return [_entry(item, index) for index, item in enumerate(files)]
    if not (
        files
        and set(map(type, files)) == {dict}
        and set(map(type, paths)) == {str}
        and set(map(type, sizes)) == {int}
        and min(sizes) >= 0
        and set(map(type, hashes)) == {str}
        and set(map(len, hashes)) == {64}
        and not "".join(hashes).strip("0123456789abcdef")
    ):
        return [_entry(item, index) for index, item in enumerate(files)]
    for path in paths:
        check_path(path)
    return list(map(FileRecord, paths, sizes, hashes))


def decode(data: bytes, *, max_members: int) -> Manifest:
    """Parse and validate manifest bytes; the caller checks the digest of ``data`` separately.

    Anything malformed raises :class:`ManifestError` (never ``RecursionError``, ``ValueError`` or
    ``UnicodeError``): deep nesting, huge numbers, lone surrogates and value floods included.
    The caller bounds ``len(data)`` (``Settings.max_manifest_bytes``); this bounds what parsing
    it may build.
    """
    _check_shape(data)
    try:
        doc = json.loads(data, parse_int=_number)
    except RecursionError:
        raise ManifestError(f"{MANIFEST_NAME} is nested too deeply; it was not written by kernel-bundler") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{MANIFEST_NAME} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{MANIFEST_NAME} must be a JSON object")
    version = doc.get("format")
    if type(version) is not int or not OLDEST_FORMAT <= version <= FORMAT_VERSION:
        raise ManifestError(
            f"{MANIFEST_NAME} has format {version!r:.40}; this kernel-bundler reads formats {OLDEST_FORMAT} "
            f"to {FORMAT_VERSION}. Upgrade kernel-bundler, or re-pack the cache with this version"
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
    if not all(isinstance(v, str) and _is_unicode(k) and _is_unicode(v) for k, v in producer.items()):
        raise ManifestError(f"{MANIFEST_NAME} has a producer fact that is not a text string")
    records = _records(files)
    manifest = Manifest(files=tuple(records), producer=producer, format=version)
    paths = [r.path for r in records]
    if paths != sorted(paths):
        raise ManifestError(
            f"{MANIFEST_NAME} files are not sorted by path; it was not written by kernel-bundler"
        )
    _check_unique(manifest.files)
    if manifest.encode() != data:
        # One file set must have one digest: extra keys, spacing or another key order would give
        # the same files a second name and defeat deduplication by digest.
        raise ManifestError(f"{MANIFEST_NAME} is not in canonical form; it was not written by kernel-bundler")
    return manifest
