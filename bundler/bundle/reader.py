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
    """The compressed stream, counting the bytes taken from it (for the expansion-ratio limit)
    and walking its frames (:class:`_Frames`) as they pass to the decompressor."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.count = 0
        self._frames = _Frames()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        if data:
            self._frames.feed(data)
        else:
            self._frames.end()
        return data


#: zstd frame magic numbers, as the first four bytes of a frame (little-endian).
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SKIPPABLE_MAGIC = b"\x2a\x4d\x18"  # bytes 1-3 of 0x184D2A50-0x184D2A5F
#: Bytes of a frame header's parts, by their flags in the Frame_Header_Descriptor (RFC 8878 3.1.1.1).
_DICT_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # flag 0 with Single_Segment_flag: 1 byte
_FRAME, _BLOCK = 0, 1


class _Frames:
    """The frame structure of the compressed bytes, walked as they are read; no decompression.

    python-zstandard's reader stops quietly where its input ends, inside a frame or not, and
    passes over skippable frames; so a bundle cut short by its frame checksum, or one carrying
    megabytes in a skippable frame or a half frame at its end, was accepted. This reads the
    frame and block headers (RFC 8878), skipping block contents, and refuses:

    * a skippable frame, or anything that is not a zstd frame, anywhere;
    * a frame that declares no content (no bundle writer makes one; 100 of them after a bundle
      are nothing but appended junk);
    * input that ends anywhere but at the end of a frame (after its checksum, when it has one).

    Work per block of up to 128 KiB, not per member: a few hundred steps for a 70 MB bundle.
    """

    def __init__(self) -> None:
        self._state = _FRAME  # the header expected next: a frame's, or a block's
        self._head = b""  # the header read so far, when a read ended inside one
        self._skip = 0  # bytes of block content (and checksum, after a last block) to pass over
        self._checksum = 0  # bytes of checksum the current frame ends with

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while True:
            if self._skip:
                taken = min(self._skip, end - pos)
                pos += taken
                self._skip -= taken
            if pos == end:
                return
            head = self._head
            want = (5 if len(head) < 5 else _header_size(head)) if self._state == _FRAME else 3
            if len(head) < want:
                piece = data[pos : pos + want - len(head)]
                pos += len(piece)
                self._head = head = head + piece
                if len(head) < want or want == 5:
                    continue  # the rest comes with the next read; or now the descriptor tells the size
            self._head = b""
            if self._state == _FRAME:
                self._checksum = _frame_header(head)
                self._state = _BLOCK
                continue
            header = int.from_bytes(head, "little")
            kind = (header >> 1) & 3
            if kind == 3:
                raise NotABundleError("not a valid zstd stream: a block of the reserved type")
            self._skip = 1 if kind == 1 else header >> 3  # an RLE block holds one byte, repeated
            if header & 1:  # the frame's last block: its content, its checksum, then a new frame
                self._skip += self._checksum
                self._state = _FRAME

    def end(self) -> None:
        """The input ended: it must end where a frame does."""
        if self._skip or self._head or self._state != _FRAME:
            raise NotABundleError(
                "the bundle is truncated: the compressed stream ends inside a zstd frame; "
                "the download or copy was cut short"
            )


def _content_size_bytes(descriptor: int) -> int:
    """Bytes of the Frame_Content_Size field its Frame_Header_Descriptor announces."""
    return _CONTENT_SIZE_BYTES[descriptor >> 6] or (1 if descriptor & 0x20 else 0)


def _header_size(head: bytes) -> int:
    """The full size of the frame header starting ``head`` (magic and descriptor at least)."""
    if head[:4] != _ZSTD_MAGIC:
        return 5  # refused by _frame_header
    descriptor = head[4]
    window = 0 if descriptor & 0x20 else 1  # no Window_Descriptor in a single-segment frame
    return 5 + window + _DICT_ID_BYTES[descriptor & 3] + _content_size_bytes(descriptor)


def _frame_header(head: bytes) -> int:
    """Check one complete frame header; the bytes of checksum its frame ends with (0 or 4)."""
    if head[1:4] == _SKIPPABLE_MAGIC and head[0] & 0xF0 == 0x50:
        raise NotABundleError("the bundle holds a skippable zstd frame; bundles are made of data frames only")
    if head[:4] != _ZSTD_MAGIC:
        raise NotABundleError("not a valid zstd stream: bytes that are not a zstd frame")
    descriptor = head[4]
    content = _content_size_bytes(descriptor)
    if content and int.from_bytes(head[len(head) - content :], "little") == 0 and content != 2:
        raise NotABundleError("the bundle holds an empty zstd frame; bundles are made of frames with data")
    return 4 if descriptor & 0x04 else 0


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
    # The second end-of-archive block is zeros like the first: a header hidden there passed
    # verify, and ``tar -i`` (which reads on past zero blocks) extracts it.
    if not src.skip_exact(_ZERO_BLOCK) and src.read(tarformat.BLOCK) != _ZERO_BLOCK:
        raise NotABundleError("the bundle's second end-of-archive block is not zeros; data is hidden there")
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
