"""Reading a bundle stream: zstd frames, then tar headers, then members checked against the manifest.

The reader is a generator of events (the manifest, then for each member its start, its bytes and
its end) that enforces the format's rules: manifest first and canonical, members in the order the
manifest's format prescribes (:func:`manifest.stream_order`) with the promised sizes, nothing but
regular files, nothing after the end but a little zero padding. It does not hash or write member
bytes; its consumer does.

:mod:`bundler.bundle.prefetch` runs it in a worker thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

from bundler.bundle import manifest, tarformat
from bundler.bundle.manifest import MANIFEST_NAME, FileRecord, Manifest
from bundler.config import Settings
from bundler.errors import (
    IntegrityError,
    LimitExceededError,
    ManifestError,
    NotABundleError,
    UnsafeMemberError,
)

#: Event kinds: (MANIFEST, Manifest), (BEGIN, FileRecord), (DATA, memoryview), (END, FileRecord).
#: :class:`~bundler.bundle.prefetch.Prefetch` may turn a BEGIN into CHECKED_BEGIN: it hashes that member itself, and raises
#: in its place before the member's END if the bytes do not match, so the consumer need not.
MANIFEST, BEGIN, DATA, END, CHECKED_BEGIN = range(5)

#: Decompressed bytes per read. Small enough that the chunks in flight between the reader thread
#: and its consumer (queue depth times batch) stay a few MiB, since every MiB of new heap costs a
#: fresh process 256 page faults, and that the first bytes of a small bundle reach the consumer
#: sooner (unpack and verify of a real 8 MB cache 13-16% faster than with 1 MiB).
_CHUNK = 256 << 10
#: Tar pads its end with zero blocks; GNU tar rounds archives up to 10 KiB records. Anything
#: beyond this much padding is not padding, and decompressing it would only burn CPU.
_MAX_TRAILING_ZEROS = 64 << 10
#: A pax header only carries a path (at most 1 KiB) and a size, plus timestamps some tars add.
_MAX_PAX_HEADER = 64 << 10
#: Decompressed bytes every bundle may reach before ``Settings.max_ratio`` applies: small bundles
#: of zero-filled files legitimately expand thousands of times.
_RATIO_FLOOR = 8 << 20
_ZERO_BLOCK = bytes(tarformat.BLOCK)


class _Counted:
    """The compressed stream, counting the bytes taken from it (for the expansion-ratio limit)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        return data


class _Source:
    """Exact-size reads over the decompressed stream, with every bound a hostile stream could test.

    zstd's memory is bounded by the window limit; the bytes decompressed by ``Settings.max_ratio``
    times the compressed bytes read (past a floor), checked per chunk; every read size must be a
    non-negative number the caller validated, and every loop takes at least one byte or stops.
    """

    def __init__(self, stream: BinaryIO, settings: Settings) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << settings.max_window_log)
        self._compressed = _Counted(stream)
        self._reader = dctx.stream_reader(
            self._compressed, read_size=_CHUNK, read_across_frames=True, closefd=False
        )
        self._chunk = bytearray()
        self._end = 0  # the bytes of ``_chunk`` that hold data (a reused buffer is not all data)
        self._view = memoryview(b"")  # always the unread end of ``_chunk[:_end]``
        self._pool: list[bytearray] = []  # chunk buffers, least recently used first
        self._done = False
        self._ratio = settings.max_ratio
        self._expanded = 0

    def _next(self) -> bool:
        if self._done:
            return False
        self._view = memoryview(b"")  # our own hold on the spent buffer, let go before reuse
        chunk = self._free_buffer()
        try:
            size = self._reader.readinto(chunk)
        except zstandard.ZstdError as exc:
            raise NotABundleError(f"not a valid zstd stream: {exc}") from exc
        if not size:
            self._done = True
            return False
        self._expanded += size
        if self._expanded > _RATIO_FLOOR + self._ratio * self._compressed.count:
            raise LimitExceededError(
                f"the bundle expands from {self._compressed.count} compressed bytes to over "
                f"{self._expanded}, more than {self._ratio} times: a decompression bomb, not a cache; "
                "raise BUNDLER_MAX_RATIO if the bundle is trusted"
            )
        self._chunk, self._end = chunk, size
        self._view = memoryview(chunk)[:size]
        return True

    def _free_buffer(self) -> bytearray:
        """A chunk buffer that no view points into any more: its consumer is done with its pieces.

        Buffers are reused rather than a new chunk allocated per read: chunks freed by the other
        thread made the heap grow and shrink, 2,000-3,000 page faults (5 us each here) in every
        fresh process's unpack of a 71 MB cache. Only a buffer nobody can see is reused, which
        the bytearray itself tells: it refuses to resize while any memoryview of it lives. The
        pool holds as many buffers as were ever in use at once, the memory the chunks took
        before; least recently used first, the one the consumer most likely finished with.
        """
        pool = self._pool
        for index, buffer in enumerate(pool):
            try:
                buffer.append(0)
            except BufferError:  # a view of it is still out there
                continue
            del buffer[-1]
            del pool[index]
            pool.append(buffer)
            return buffer
        buffer = bytearray(_CHUNK)
        pool.append(buffer)
        return buffer

    def pieces(self, size: int) -> Iterator[memoryview]:
        """Exactly ``size`` bytes as successive views; raises if the stream ends first."""
        _check_size(size)
        while size > 0:
            if not self._view and not self._next():
                raise NotABundleError("the bundle is truncated: the stream ended inside a tar member")
            piece = self._view[:size]
            self._view = self._view[len(piece) :]
            size -= len(piece)
            yield piece

    def take(self, size: int) -> memoryview | None:
        """The next ``size`` bytes as one view when the current chunk holds them all (most members
        of a cache: a generator per member showed in unpack profiles), else None: use ``pieces``."""
        _check_size(size)
        if len(self._view) < size:
            return None
        piece = self._view[:size]
        self._view = self._view[size:]
        return piece

    def skip_exact(self, expected: bytes) -> bool:
        """Pass over ``expected`` if the current chunk goes on with exactly those bytes; else take
        nothing. One C-speed ``startswith`` on the chunk, with no copy (comparing a memoryview
        slice costs ten times as much)."""
        view = self._view
        if len(view) >= len(expected) and self._chunk.startswith(expected, self._end - len(view), self._end):
            self._view = view[len(expected) :]
            return True
        return False

    def skip(self, size: int) -> None:
        """Pass over ``size`` bytes (tar padding) without copying them out."""
        _check_size(size)
        if len(self._view) >= size:
            self._view = self._view[size:]
        else:
            self.read(size)

    def read(self, size: int) -> bytes:
        _check_size(size)
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


def _check_size(size: int) -> None:
    """The last line of defence: sizes are validated where they are parsed, never trusted here."""
    if type(size) is not int or size < 0:
        raise NotABundleError(f"the bundle asks to read {size!r} bytes; sizes are never negative")


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
    size = inner.size
    if "size" in records:  # checked by parse_pax: decimal digits only
        size = tarformat.parse_decimal(records["size"], f"the pax size of member {expected!r}")
    return tarformat.Header(typeflag=b"0", name=records.get("path", inner.name), size=size)


def _manifest(src: _Source, settings: Settings, expected_digest: str | None) -> Manifest:
    try:
        header = _member_header(src, MANIFEST_NAME)
    except NotABundleError as exc:
        raise NotABundleError(f"not a bundle: {exc}") from exc
    if header is None or header.name != MANIFEST_NAME:
        found = "nothing" if header is None else repr(header.name)
        raise ManifestError(f"the first member must be {MANIFEST_NAME}, found {found}; not a kernel-bundler bundle")
    limit = settings.max_manifest_bytes
    if header.size > limit:
        raise LimitExceededError(
            f"{MANIFEST_NAME} is {header.size} bytes, over the limit of {limit}; "
            "raise BUNDLER_MAX_MANIFEST_BYTES if the bundle is trusted"
        )
    hasher = hashlib.sha256()
    data = bytearray()
    for piece in src.pieces(header.size):
        hasher.update(piece)
        data += piece
    src.read(tarformat.padding(header.size))
    digest = hasher.hexdigest()
    if expected_digest is not None and digest != expected_digest:
        raise IntegrityError(
            f"the bundle's manifest hashes to {digest}, not the requested {expected_digest}: "
            "the object is corrupt or was replaced; delete it from the store and push it again"
        )
    # Only now, with the digest checked when one was asked for, is the manifest parsed.
    man = manifest.decode(data, max_members=settings.max_members)  # type: ignore[arg-type]
    return manifest.check_fits(man, header.size, settings)


def _unexpected(name: str, man: Manifest) -> UnsafeMemberError:
    """The error for a tar member other than the one the manifest's order expects (never the
    common path: the manifest's names are gathered here only)."""
    manifest.check_path(name)
    if name == MANIFEST_NAME or any(record.path == name for record in man.files):
        order = "path order" if man.format == 1 else "order of extension, then path"
        return UnsafeMemberError(
            f"member {name!r} appears twice or out of order (a format {man.format} bundle holds its "
            f"members in {order})"
        )
    return UnsafeMemberError(f"member {name!r} is not in the manifest")


def read_manifest(stream: BinaryIO, settings: Settings, expected_digest: str | None = None) -> Manifest:
    """Only the first member: cheap, for listing; the files are not checked."""
    return _manifest(_Source(stream, settings), settings, expected_digest)


def events(stream: BinaryIO, settings: Settings, expected_digest: str | None = None) -> Iterator[tuple[int, object]]:
    """The bundle as events, every structural rule enforced; member hashes are the consumer's job."""
    src = _Source(stream, settings)
    man = _manifest(src, settings, expected_digest)
    yield MANIFEST, man
    file_header = tarformat.file_header
    for record in manifest.stream_order(man):
        size = record.size
        # A bundle we wrote holds, for this record, exactly the header our writer makes for it,
        # and those bytes pass every check of the full parse. Comparing them is ~8 us a member
        # cheaper than parsing: events() over the 1,595-file benchmark cache took 73 ms, not 95.
        # Any other header, hostile or merely another writer's, is parsed and judged in full.
        if not src.skip_exact(file_header(record.path, size)):
            _check_header(src, record, man)
        yield BEGIN, record
        whole = src.take(size) if size else None
        if whole is not None:
            yield DATA, whole
        else:
            for piece in src.pieces(size):
                yield DATA, piece
        src.skip(tarformat.padding(size))
        yield END, record
    header = _member_header(src, "end of archive")
    if header is not None:
        raise _unexpected(header.name, man)
    src.read(tarformat.BLOCK)  # the second end-of-archive block
    if not src.rest_is_zero(_MAX_TRAILING_ZEROS):
        raise NotABundleError("the bundle has data after the end of the tar archive")


def _check_header(src: _Source, record: FileRecord, man: Manifest) -> None:
    """Read and check the header of the member the manifest's order expects next: ``record``."""
    header = _member_header(src, record.path)
    if header is None:
        raise IntegrityError(f"member {record.path!r} is listed in the manifest but missing from the bundle")
    if header.name != record.path:
        raise _unexpected(header.name, man)
    if header.size != record.size:
        raise IntegrityError(
            f"member {record.path!r} is {header.size} bytes in the tar but {record.size} in the manifest"
        )


def check_hash(record: FileRecord, digest: hashlib._Hash) -> None:
    if digest.hexdigest() != record.sha256:
        raise IntegrityError(f"member {record.path!r} does not match its sha256 in the manifest")
