"""The bundle format: pack files into a zstd-compressed tar, and unpack one safely.

A bundle is a plain tar stream (``tar --zstd -xf`` reads it) whose first member, MANIFEST.json,
lists every file's path, size and sha256; the bundle's digest is the sha256 of that manifest. So a
reader that asked for a digest can check the manifest, and through it every byte, while the bytes
stream past: no seeking, no temp copy of the archive, nothing visible until all of it verified.

Speed notes (numbers in benchmarks/README.md): packing hashes files first (the manifest comes
first) and then feeds zstd's worker threads; unpacking decompresses in a worker thread while the
caller's thread parses, hashes and writes, which is what lets two cores keep up with
``zstd -dc | tar -x``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import queue
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from bundler import __version__, manifest, tarformat
from bundler.config import Settings
from bundler.errors import (
    BundleError,
    IntegrityError,
    LimitExceededError,
    ManifestError,
    NotABundleError,
    UnsafeMemberError,
)
from bundler.manifest import MANIFEST_NAME, FileRecord, Manifest
from bundler.placement import STAGING_PREFIX, Destination, Placement, _local_error

Source = Path | str | Mapping[str, Path | str | bytes]

_CHUNK = 1 << 20
#: Compressed member data is spooled in memory up to this size while the manifest is computed.
_SPOOL_IN_MEMORY = 256 << 20
_JOB_SIZE = 16 << 20
#: Manifest size allowed per permitted member: an entry is ~130 bytes plus its path.
_MANIFEST_BYTES_PER_MEMBER = 256
#: Tar pads its end with zero blocks; GNU tar rounds archives up to 10 KiB records. Anything
#: beyond this much padding is not padding, and decompressing it would only burn CPU.
_MAX_TRAILING_ZEROS = 64 << 10
#: Members a rewriter wants (Triton group files) are buffered whole; real ones are a few KB.
_MAX_REWRITTEN_MEMBER = 1 << 20
_WHOLE_FILE = 64 << 20
_BATCH = 1 << 20


@dataclasses.dataclass(frozen=True)
class PackResult:
    digest: str
    manifest: Manifest
    compressed_size: int


class Rewriter(Protocol):
    """Adjusts a member's bytes for the place it lands (e.g. absolute paths in Triton group files).

    Called after the member verified against the manifest and before it becomes visible.
    """

    def wants(self, name: str) -> bool: ...

    def __call__(self, name: str, data: bytes, target: Path) -> bytes: ...


def default_producer() -> dict[str, str]:
    """Facts about the packing environment; they are part of the manifest and so of the digest."""
    facts = {
        "bundler": __version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "platform": f"{platform.system().lower()}-{platform.machine()}",
    }
    try:
        from importlib.metadata import PackageNotFoundError, version

        facts["triton"] = version("triton")
    except PackageNotFoundError:
        pass
    return facts


# --- pack ----------------------------------------------------------------------------------------


def _collect(source: Source) -> list[tuple[str, Path | bytes]]:
    if isinstance(source, Mapping):
        items = [(name, data if isinstance(data, bytes) else Path(data)) for name, data in source.items()]
    else:
        items = list(_walk(Path(source)))
    for name, _ in items:
        manifest.check_path(name)
    items.sort(key=lambda item: item[0])
    return items


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    if not root.is_dir():
        raise BundleError(f"cannot pack {root}: not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(STAGING_PREFIX)]
        for link in (d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            raise UnsafeMemberError(_link_message(Path(dirpath, link)))
        for filename in filenames:
            path = Path(dirpath, filename)
            if path.is_symlink():
                raise UnsafeMemberError(_link_message(path))
            if not path.is_file():
                raise UnsafeMemberError(
                    f"cannot pack {path}: not a regular file (bundles hold regular files only)"
                )
            yield path.relative_to(root).as_posix(), path


def _link_message(path: Path) -> str:
    return (
        f"cannot pack {path}: it is a symbolic link and bundles hold regular files only; "
        "copy the target in place of the link or remove it"
    )


def _read_whole(fd: int, size: int) -> bytes:
    data = os.read(fd, size + 1)
    while len(data) < size:  # large reads can come back short
        more = os.read(fd, size + 1 - len(data))
        if not more:
            break
        data += more
    return data


def _file_chunks(origin: Path, name: str) -> tuple[int, Iterator[bytes]]:
    """Open a source file once: its size (for the tar header) and an iterator over its bytes.

    Small files (nearly all of a cache) are read in one call; a file whose size changes while it
    is read is an error, since the header already promised its size.
    """
    try:
        fd = os.open(origin, os.O_RDONLY)
    except OSError as exc:
        raise BundleError(f"cannot read {origin} to pack it as {name!r}: {exc.strerror or exc}") from exc

    def chunks() -> Iterator[bytes]:
        try:
            if size <= _WHOLE_FILE:
                data = _read_whole(fd, size)
                if len(data) != size:
                    raise _changed(origin)
                yield data
                return
            remaining = size
            while remaining > 0:
                chunk = os.read(fd, min(remaining, _CHUNK))
                if not chunk:
                    raise _changed(origin)
                remaining -= len(chunk)
                yield chunk
            if os.read(fd, 1):
                raise _changed(origin)
        except OSError as exc:
            raise BundleError(f"cannot read {origin} to pack it as {name!r}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    size = os.fstat(fd).st_size
    return size, chunks()


def _changed(origin: Path) -> BundleError:
    return BundleError(f"{origin} changed size while it was being packed; pack again once the cache is quiet")


def _write_members(items: list[tuple[str, Path | bytes]], writer: BinaryIO) -> list[FileRecord]:
    """Stream every member into ``writer`` while hashing it: each file is read exactly once.

    Writes go to zstd in batches of about a megabyte: thousands of small writes cost more in
    stream-writer calls than the compression itself.
    """
    records = []
    batch: list[bytes] = []
    pending = 0
    for name, origin in items:
        if isinstance(origin, bytes):
            size, chunks = len(origin), iter((origin,))
        else:
            size, chunks = _file_chunks(origin, name)
        batch.append(tarformat.file_header(name, size))
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
            batch.append(chunk)
            pending += len(chunk)
        batch.append(bytes(tarformat.padding(size)))
        records.append(FileRecord(name, size, digest.hexdigest()))
        if pending >= _BATCH:
            writer.write(b"".join(batch))
            batch, pending = [], 0
    batch.append(tarformat.END_OF_ARCHIVE)
    writer.write(b"".join(batch))
    return records


def compressor(settings: Settings) -> zstandard.ZstdCompressor:
    """zstd at the configured level with long-distance matching, so far-apart repeats compress.

    Real caches repeat kernels inside Inductor's FX-graph pickles, far apart: ``--long=27`` made
    the H200 caches 2.6x smaller. A fixed 16 MiB job size keeps long matching parallel (zstd would
    otherwise make one job of the whole window) and makes the output independent of the number of
    threads, so every machine produces the same bytes.
    """
    long = {"enable_ldm": True, "window_log": settings.long_window_log} if settings.long_window_log else {}
    params = zstandard.ZstdCompressionParameters.from_level(
        settings.zstd_level,
        threads=settings.zstd_threads or os.cpu_count() or 1,
        job_size=_JOB_SIZE,
        write_checksum=True,
        **long,
    )
    return zstandard.ZstdCompressor(compression_params=params)


class _Counting:
    """Counts bytes on their way to the caller's file object."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.count = 0

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self.count += len(data)
        return len(data)


def pack(
    source: Source,
    out: BinaryIO,
    *,
    settings: Settings | None = None,
    producer: Mapping[str, str] | None = None,
) -> PackResult:
    """Write a bundle of ``source`` (a directory, or arcname -> path or bytes) to ``out``.

    The output is byte-identical for the same files and producer facts, whatever the order of
    discovery, mtimes or owners. The manifest must come first but needs every file's hash, so the
    members are compressed (and hashed, in one read) into a spool first, then written after a
    separate zstd frame holding the manifest; concatenated frames are one valid zstd stream.
    ``out`` receives a partial stream if this raises: callers that write files write to a
    temporary name and rename.
    """
    settings = settings or Settings.from_env()
    items = _collect(source)
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as body:
        writer = compressor(settings).stream_writer(body, closefd=False)
        records = _write_members(items, writer)
        writer.close()
        man = manifest.build(records, default_producer() if producer is None else producer)
        encoded = man.encode()
        head = tarformat.file_header(MANIFEST_NAME, len(encoded)) + encoded + bytes(tarformat.padding(len(encoded)))
        sink = _Counting(out)
        sink.write(compressor(settings).compress(head))
        body.seek(0)
        shutil.copyfileobj(body, sink, _CHUNK)
    return PackResult(digest=man.digest, manifest=man, compressed_size=sink.count)


# --- unpack --------------------------------------------------------------------------------------


_EOF = object()


class _Decompressed:
    """Decompressed bytes made by a worker thread, read by the caller in exact sizes.

    zstd releases the GIL, so while the caller hashes and writes one chunk the worker is already
    inflating (and, for an HTTP body, receiving) the next. The queue is bounded, so memory stays
    at a few chunks however large the bundle.
    """

    def __init__(self, stream: BinaryIO, max_window_log: int) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << max_window_log)
        self._reader = dctx.stream_reader(stream, read_size=_CHUNK, read_across_frames=True, closefd=False)
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self._view = memoryview(b"")
        self._done = False
        self.position = 0
        self._thread = threading.Thread(target=self._produce, name="bundler-unzstd", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._reader.read(_CHUNK)
                if not chunk:
                    self._put(_EOF)
                    return
                self._put(chunk)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._put(exc)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next(self) -> bool:
        if self._done:
            return False
        item = self._queue.get()
        if item is _EOF:
            self._done = True
            return False
        if isinstance(item, zstandard.ZstdError):
            raise NotABundleError(f"not a valid zstd stream: {item}") from item
        if isinstance(item, BaseException):
            raise item
        self._view = memoryview(item)
        return True

    def pieces(self, size: int) -> Iterator[memoryview]:
        """Exactly ``size`` bytes as successive views; raises if the stream ends first."""
        while size:
            if not self._view and not self._next():
                raise NotABundleError("the bundle is truncated: the stream ended inside a tar member")
            piece = self._view[:size]
            self._view = self._view[len(piece) :]
            size -= len(piece)
            self.position += len(piece)
            yield piece

    def read(self, size: int) -> bytes:
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

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _read_member_header(src: _Decompressed, expected: str) -> tarformat.Header | None:
    """The next file header (pax records folded in), or None at the end-of-archive marker."""
    block = src.read(tarformat.BLOCK)
    if block == b"\0" * tarformat.BLOCK:
        return None
    header = tarformat.parse_header(block)
    if header.typeflag != b"x":
        return header
    if header.size > 1 << 20:
        raise LimitExceededError(
            f"pax header of {header.size} bytes before {expected!r} is implausibly large"
        )
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


def _read_manifest(src: _Decompressed, settings: Settings, expected_digest: str | None) -> Manifest:
    try:
        header = _read_member_header(src, MANIFEST_NAME)
    except NotABundleError as exc:
        raise NotABundleError(f"not a bundle: {exc}") from exc
    if header is None or header.name != MANIFEST_NAME:
        found = "nothing" if header is None else repr(header.name)
        raise ManifestError(
            f"the first member must be {MANIFEST_NAME}, found {found}; not a kernel-bundler bundle"
        )
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


def _members(src: _Decompressed, man: Manifest) -> Iterator[tuple[FileRecord, Iterator[memoryview]]]:
    """Yield each manifest record with its payload, enforcing order, names and sizes."""
    names = {record.path for record in man.files}
    for record in man.files:
        header = _read_member_header(src, record.path)
        if header is None:
            raise IntegrityError(
                f"member {record.path!r} is listed in the manifest but missing from the bundle"
            )
        if header.name != record.path:
            manifest.check_path(header.name)
            if header.name == MANIFEST_NAME or header.name in names:
                raise UnsafeMemberError(f"member {header.name!r} appears twice or out of manifest order")
            raise UnsafeMemberError(f"member {header.name!r} is not in the manifest")
        if header.size != record.size:
            raise IntegrityError(
                f"member {record.path!r} is {header.size} bytes in the tar but {record.size} in the manifest"
            )
        payload = src.pieces(record.size)
        yield record, payload
        for _ in payload:  # a consumer that stopped early still leaves the stream aligned
            pass
        src.read(tarformat.padding(record.size))
    header = _read_member_header(src, "end of archive")
    if header is not None:
        manifest.check_path(header.name)
        if header.name in names or header.name == MANIFEST_NAME:
            raise UnsafeMemberError(f"member {header.name!r} appears twice in the bundle")
        raise UnsafeMemberError(f"member {header.name!r} is not in the manifest")
    src.read(tarformat.BLOCK)  # second end-of-archive block
    if not src.rest_is_zero(_MAX_TRAILING_ZEROS):
        raise NotABundleError("the bundle has data after the end of the tar archive")


def _check_hash(record: FileRecord, digest: hashlib._Hash) -> None:
    if digest.hexdigest() != record.sha256:
        raise IntegrityError(f"member {record.path!r} does not match its sha256 in the manifest")


def _write_member(staged: str, pieces: Iterator[memoryview], name: str, record: FileRecord | None = None) -> None:
    """Write one member to its staging file, checking it against ``record`` on the way.

    ``record`` is None only for bytes that were verified before a rewriter changed them.
    """
    digest = hashlib.sha256() if record is not None else None
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise _local_error(exc, "write", staged) from exc
    try:
        for piece in pieces:
            if digest is not None:
                digest.update(piece)
            while piece:
                piece = piece[os.write(fd, piece) :]
    except OSError as exc:
        raise _local_error(exc, f"write member {name!r} to", staged) from exc
    finally:
        os.close(fd)
    if record is not None:
        _check_hash(record, digest)


def _read_checked(pieces: Iterator[memoryview], record: FileRecord) -> bytes:
    data = b"".join(pieces)
    _check_hash(record, hashlib.sha256(data))
    return data


def _open(stream: BinaryIO, settings: Settings | None, expected_digest: str | None):
    settings = settings or Settings.from_env()
    if expected_digest is not None:
        manifest.check_digest(expected_digest)
    src = _Decompressed(stream, settings.max_window_log)
    return src, settings


def unpack(
    stream: BinaryIO,
    dest: Destination,
    *,
    expected_digest: str | None = None,
    settings: Settings | None = None,
    rewrite: Rewriter | None = None,
) -> Manifest:
    """Verify and extract a bundle read front to back from ``stream`` (no seeking needed).

    ``dest`` is a directory, or a mapping from a member's first path component to the directory
    that component unpacks into. Raises a :class:`BundleError` subclass, naming the member and the
    rule it broke, and leaves every destination as it was, if anything at all is wrong.
    """
    src, settings = _open(stream, settings, expected_digest)
    placement = Placement(dest)
    try:
        man = _read_manifest(src, settings, expected_digest)
        for record, pieces in _members(src, man):
            staged, target = placement.stage(record.path)
            if rewrite is not None and rewrite.wants(record.path):
                if record.size > _MAX_REWRITTEN_MEMBER:
                    raise LimitExceededError(
                        f"member {record.path!r} is {record.size} bytes; files of its kind are small, "
                        "so the bundle is not a plausible cache"
                    )
                data = rewrite(record.path, _read_checked(pieces, record), target)
                _write_member(staged, iter([memoryview(data)]), record.path)
            else:
                _write_member(staged, pieces, record.path, record)
        placement.commit()
        return man
    finally:
        placement.abort()
        src.close()


def verify(
    stream: BinaryIO, *, expected_digest: str | None = None, settings: Settings | None = None
) -> Manifest:
    """Check a bundle completely, as ``unpack`` would, without writing anything."""
    src, settings = _open(stream, settings, expected_digest)
    try:
        man = _read_manifest(src, settings, expected_digest)
        for record, pieces in _members(src, man):
            digest = hashlib.sha256()
            for piece in pieces:
                digest.update(piece)
            _check_hash(record, digest)
        return man
    finally:
        src.close()


def read_manifest(stream: BinaryIO, *, settings: Settings | None = None) -> Manifest:
    """Only the manifest (the first member): cheap, for listing; does not verify the files."""
    src, settings = _open(stream, settings, None)
    try:
        return _read_manifest(src, settings, None)
    finally:
        src.close()


def iter_files(
    stream: BinaryIO, *, expected_digest: str | None = None, settings: Settings | None = None
) -> Iterator[tuple[FileRecord, bytes]]:
    """Each verified member with its bytes, for small bundles consumed in memory (inspection, tests)."""
    src, settings = _open(stream, settings, expected_digest)
    try:
        man = _read_manifest(src, settings, expected_digest)
        for record, pieces in _members(src, man):
            yield record, _read_checked(pieces, record)
    finally:
        src.close()
