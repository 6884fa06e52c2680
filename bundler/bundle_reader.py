"""Reading a bundle stream: zstd frames, then tar headers, then members checked against the manifest.

The reader is a generator of events (the manifest, then for each member its start, its bytes and
its end) that enforces the format's rules: manifest first and canonical, members in manifest
order with the promised sizes, nothing but regular files, nothing after the end but a little zero
padding. It does not hash or write member bytes; its consumer does.

:class:`Prefetch` runs it in a worker thread. zstd releases the GIL, so two cores share the work:
the worker decompresses and parses, the caller hashes and writes, and with ``share_hashing`` the
worker also hashes members whenever the caller falls behind. Events cross the thread boundary in
batches of about a megabyte, so a cache of thousands of small files does not pay a queue hand-off
per file.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

from bundler import manifest, tarformat
from bundler.config import Settings
from bundler.errors import (
    IntegrityError,
    LimitExceededError,
    ManifestError,
    NotABundleError,
    UnsafeMemberError,
)
from bundler.manifest import MANIFEST_NAME, FileRecord, Manifest

#: Event kinds: (MANIFEST, Manifest), (BEGIN, FileRecord), (DATA, memoryview), (END, FileRecord).
#: :class:`Prefetch` may turn a BEGIN into CHECKED_BEGIN: it hashes that member itself, and raises
#: in its place before the member's END if the bytes do not match, so the consumer need not.
MANIFEST, BEGIN, DATA, END, CHECKED_BEGIN = range(5)

_CHUNK = 1 << 20
#: Manifest size allowed per permitted member: an entry is ~130 bytes plus its path.
_MANIFEST_BYTES_PER_MEMBER = 256
#: Tar pads its end with zero blocks; GNU tar rounds archives up to 10 KiB records. Anything
#: beyond this much padding is not padding, and decompressing it would only burn CPU.
_MAX_TRAILING_ZEROS = 64 << 10
_MAX_PAX_HEADER = 1 << 20
_ZERO_BLOCK = bytes(tarformat.BLOCK)


class _Source:
    """Exact-size reads over the decompressed stream; the window limit bounds zstd's memory."""

    def __init__(self, stream: BinaryIO, max_window_log: int) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << max_window_log)
        self._reader = dctx.stream_reader(stream, read_size=_CHUNK, read_across_frames=True, closefd=False)
        self._view = memoryview(b"")
        self._done = False

    def _next(self) -> bool:
        if self._done:
            return False
        try:
            chunk = self._reader.read(_CHUNK)
        except zstandard.ZstdError as exc:
            raise NotABundleError(f"not a valid zstd stream: {exc}") from exc
        if not chunk:
            self._done = True
            return False
        self._view = memoryview(chunk)
        return True

    def pieces(self, size: int) -> Iterator[memoryview]:
        """Exactly ``size`` bytes as successive views; raises if the stream ends first."""
        while size:
            if not self._view and not self._next():
                raise NotABundleError("the bundle is truncated: the stream ended inside a tar member")
            piece = self._view[:size]
            self._view = self._view[len(piece) :]
            size -= len(piece)
            yield piece

    def read(self, size: int) -> bytes:
        if len(self._view) >= size:  # the common case (headers, padding): one slice, no generator
            piece = self._view[:size]
            self._view = self._view[size:]
            return piece.tobytes()
        return b"".join(self.pieces(size))

    def rest_is_zero(self, limit: int) -> bool:
        """Consume what is left: at most ``limit`` bytes of zero padding, nothing else."""
        seen = 0
        while True:
            seen += len(self._view)
            if seen > limit or self._view.tobytes().strip(b"\0"):
                return False
            self._view = memoryview(b"")
            if not self._next():
                return True


def _member_header(src: _Source, expected: str) -> tarformat.Header | None:
    """The next file header (pax records folded in), or None at the end-of-archive marker."""
    block = src.read(tarformat.BLOCK)
    if block == _ZERO_BLOCK:
        return None
    header = tarformat.parse_header(block)
    if header.typeflag != b"x":
        return header
    if header.size > _MAX_PAX_HEADER:
        raise LimitExceededError(f"pax header of {header.size} bytes before {expected!r} is implausibly large")
    records = tarformat.parse_pax(src.read(header.size), expected)
    src.read(tarformat.padding(header.size))
    inner = tarformat.parse_header(src.read(tarformat.BLOCK))
    if inner.typeflag == b"x":
        raise NotABundleError(f"two pax headers in a row before {expected!r}")
    try:
        size = int(records.get("size", inner.size))
    except ValueError:
        raise NotABundleError(f"pax size of member {expected!r} is not a number") from None
    return tarformat.Header(typeflag=b"0", name=records.get("path", inner.name), size=size)


def _manifest(src: _Source, settings: Settings, expected_digest: str | None) -> Manifest:
    try:
        header = _member_header(src, MANIFEST_NAME)
    except NotABundleError as exc:
        raise NotABundleError(f"not a bundle: {exc}") from exc
    if header is None or header.name != MANIFEST_NAME:
        found = "nothing" if header is None else repr(header.name)
        raise ManifestError(f"the first member must be {MANIFEST_NAME}, found {found}; not a kernel-bundler bundle")
    limit = max(1 << 20, settings.max_members * _MANIFEST_BYTES_PER_MEMBER)
    if header.size > limit:
        raise LimitExceededError(
            f"{MANIFEST_NAME} is {header.size} bytes, over the limit of {limit} for "
            f"{settings.max_members} members; raise BUNDLER_MAX_MEMBERS if the bundle is trusted"
        )
    hasher = hashlib.sha256()
    pieces = []
    for piece in src.pieces(header.size):
        hasher.update(piece)
        pieces.append(bytes(piece))
    src.read(tarformat.padding(header.size))
    digest = hasher.hexdigest()
    if expected_digest is not None and digest != expected_digest:
        raise IntegrityError(
            f"the bundle's manifest hashes to {digest}, not the requested {expected_digest}: "
            "the object is corrupt or was replaced; delete it from the store and push it again"
        )
    # Only now, with the digest checked when one was asked for, is the manifest parsed.
    man = manifest.decode(b"".join(pieces), max_members=settings.max_members)
    if man.total_size > settings.max_bundle_bytes:
        raise LimitExceededError(
            f"the bundle unpacks to {man.total_size} bytes, over the limit of {settings.max_bundle_bytes}; "
            "raise BUNDLER_MAX_BUNDLE_BYTES if it is trusted"
        )
    return man


def _unexpected(name: str, names: set[str]) -> UnsafeMemberError:
    manifest.check_path(name)
    if name == MANIFEST_NAME or name in names:
        return UnsafeMemberError(f"member {name!r} appears twice or out of manifest order")
    return UnsafeMemberError(f"member {name!r} is not in the manifest")


def read_manifest(stream: BinaryIO, settings: Settings, expected_digest: str | None = None) -> Manifest:
    """Only the first member: cheap, for listing; the files are not checked."""
    return _manifest(_Source(stream, settings.max_window_log), settings, expected_digest)


def events(stream: BinaryIO, settings: Settings, expected_digest: str | None = None) -> Iterator[tuple[int, object]]:
    """The bundle as events, every structural rule enforced; member hashes are the consumer's job."""
    src = _Source(stream, settings.max_window_log)
    man = _manifest(src, settings, expected_digest)
    yield MANIFEST, man
    names = {record.path for record in man.files}
    for record in man.files:
        header = _member_header(src, record.path)
        if header is None:
            raise IntegrityError(f"member {record.path!r} is listed in the manifest but missing from the bundle")
        if header.name != record.path:
            raise _unexpected(header.name, names)
        if header.size != record.size:
            raise IntegrityError(
                f"member {record.path!r} is {header.size} bytes in the tar but {record.size} in the manifest"
            )
        yield BEGIN, record
        for piece in src.pieces(record.size):
            yield DATA, piece
        src.read(tarformat.padding(record.size))
        yield END, record
    header = _member_header(src, "end of archive")
    if header is not None:
        raise _unexpected(header.name, names)
    src.read(tarformat.BLOCK)  # the second end-of-archive block
    if not src.rest_is_zero(_MAX_TRAILING_ZEROS):
        raise NotABundleError("the bundle has data after the end of the tar archive")


_DONE = object()
_BATCH_BYTES = 1 << 20
_BATCH_EVENTS = 512


class Prefetch:
    """Iterates ``source`` in a worker thread; the caller gets the same items, in order.

    An exception in the worker reaches the caller after every item produced before it, so the
    caller's view is exactly that of iterating ``source`` itself. Memory is bounded by the queue
    depth times the batch size. ``close`` stops the worker early (the caller gave up).

    With ``share_hashing``, the worker balances the load: when the caller falls behind (batches
    pile up in the queue), the worker hashes the next member itself and hands it over as
    CHECKED_BEGIN. Decompressing is cheaper than hashing plus writing, so on two cores a fixed
    split leaves one of them idle; this one adapts to whichever side is slower on the machine.
    """

    def __init__(self, source: Iterator[tuple[int, object]], depth: int = 8, share_hashing: bool = False) -> None:
        self._source = _worker_hashes(source, self) if share_hashing else source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="bundler-read", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        batch: list[tuple[int, object]] = []
        size = 0
        try:
            for event in self._source:
                batch.append(event)
                if event[0] == DATA:
                    size += len(event[1])  # type: ignore[arg-type]
                if size >= _BATCH_BYTES or len(batch) >= _BATCH_EVENTS:
                    if not self._put(batch):
                        return
                    batch, size = [], 0
            self._put(batch) and self._put(_DONE)
        except BaseException as exc:  # handed over, and raised in the caller's thread
            self._put(batch) and self._put(exc)
        finally:
            self._source.close()  # type: ignore[attr-defined]

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, object]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item  # type: ignore[misc]

    def backlog(self) -> int:
        """Batches produced and not yet taken by the caller."""
        return self._queue.qsize()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _worker_hashes(source: Iterator[tuple[int, object]], prefetch: Prefetch) -> Iterator[tuple[int, object]]:
    """``source``, hashing and checking the members that start while the caller is behind."""
    hasher = None
    try:
        for kind, value in source:
            if kind == DATA:
                if hasher is not None:
                    hasher.update(value)  # type: ignore[arg-type]
            elif kind == BEGIN:
                if prefetch.backlog() >= _CALLER_BEHIND:
                    hasher = hashlib.sha256()
                    kind = CHECKED_BEGIN
            elif kind == END and hasher is not None:
                check_hash(value, hasher)  # type: ignore[arg-type]
                hasher = None
            yield kind, value
    finally:
        source.close()  # type: ignore[attr-defined]


#: Batches waiting in the queue at which the caller counts as behind.
_CALLER_BEHIND = 2


def check_hash(record: FileRecord, digest: hashlib._Hash) -> None:
    if digest.hexdigest() != record.sha256:
        raise IntegrityError(f"member {record.path!r} does not match its sha256 in the manifest")
