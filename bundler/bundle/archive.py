"""The bundle format's public face: pack a cache, and unpack, verify or inspect a bundle.

A bundle is a plain tar stream (``tar --zstd -xf`` reads it) whose first member, MANIFEST.json,
lists every file's path, size and sha256; the bundle's digest is the sha256 of that manifest. So a
reader that asked for a digest can check the manifest, and through it every byte, while the bytes
stream past: no seeking, no temp copy of the archive, nothing visible until all of it verified.

Writing lives in :mod:`bundler.bundle.writer`, the format's rules in
:mod:`bundler.bundle.reader`, putting files in place in :mod:`bundler.bundle.placement`; this module
connects them. Speed notes and numbers: benchmarks/README.md.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from bundler.bundle import manifest
from bundler.bundle import reader as bundle_reader
from bundler.bundle.manifest import FileRecord, Manifest
from bundler.bundle.placement import Destination, Placement, Staged, local_error
from bundler.bundle.prefetch import Prefetch
from bundler.bundle.reader import BEGIN, CHECKED_BEGIN, DATA, END, MANIFEST, check_hash
from bundler.config import Settings
from bundler.errors import LimitExceededError
from bundler.fileio import REAL_OPS, FileOps

if TYPE_CHECKING:  # pragma: no cover
    from bundler.bundle.writer import PackResult, Source, compressor, pack, packed

#: The writing half, imported when first used: ``bundler unpack`` and ``begin_compile`` never pack.
_WRITER_NAMES = frozenset({"PackResult", "Source", "compressor", "pack", "packed"})


def __getattr__(name: str) -> object:
    if name not in _WRITER_NAMES:
        raise AttributeError(f"module 'bundler.bundle.archive' has no attribute {name!r}")
    from bundler.bundle import writer as bundle_writer

    value = getattr(bundle_writer, name)
    globals()[name] = value
    return value


__all__ = [
    "PackResult", "Rewriter", "Source", "compressor", "iter_files", "pack", "packed",
    "read_manifest", "unpack", "verify",
]

#: Members a rewriter wants (Triton group files) are buffered whole; real ones are a few KB.
_MAX_REWRITTEN_MEMBER = 1 << 20


class Rewriter(Protocol):
    """Adjusts a member's bytes for the place it lands (e.g. absolute paths in Triton group files).

    Called after the member verified against the manifest and before it becomes visible.
    """

    def wants(self, name: str) -> bool: ...

    def __call__(self, name: str, data: bytes, target: Path) -> bytes: ...


class _Hasher:
    """The sink of ``verify``: every member hashed (unless the reader already checked it)."""

    _digest: hashlib._Hash | None

    def begin(self, record: FileRecord, checked: bool = False) -> None:
        self._digest = None if checked else hashlib.sha256()

    def data(self, piece: memoryview) -> None:
        if self._digest is not None:
            self._digest.update(piece)

    def end(self, record: FileRecord) -> None:
        if self._digest is not None:
            check_hash(record, self._digest)


class _Extractor(_Hasher):
    """The sink of ``unpack``: each member hashed while it is written to its staging file.

    Staging files are created relative to the staging folder's descriptor, never by path, and
    every write goes through ``ops`` (the seam tests use to fill the disk at the k-th write).
    """

    #: New, never-existing files only; the mode is 0666 less the umask, as ``open`` would make it.
    _FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(self, placement: Placement, rewrite: Rewriter | None, ops: FileOps) -> None:
        self._placement = placement
        self._rewrite = rewrite
        self._wants = rewrite.wants if rewrite is not None else None
        # Bound once: three calls per member (FileOps makes them the os functions themselves).
        self._os_open = ops.open
        self._os_write = ops.write
        self._staged: Staged | None = None
        self._fd = -1
        self._held: list[bytes] | None = None  # a member the rewriter wants, held until verified

    def begin(self, record: FileRecord, checked: bool = False) -> None:
        self._digest = None if checked else hashlib.sha256()
        staged = self._staged = self._placement.stage(record.path)
        if self._wants is not None and self._wants(record.path):
            if record.size > _MAX_REWRITTEN_MEMBER:
                raise LimitExceededError(
                    f"member {record.path!r} is {record.size} bytes; files of its kind are small, "
                    "so the bundle is not a plausible cache"
                )
            self._held = []
            return
        self._held = None
        self._fd = self._open(staged)

    def data(self, piece: memoryview) -> None:
        if self._digest is not None:
            self._digest.update(piece)
        self._placement.keep_alive()
        if self._held is not None:
            self._held.append(bytes(piece))
            return
        try:
            while piece:
                written = self._os_write(self._fd, piece)
                if written == len(piece):
                    break
                piece = piece[written:]  # a short write: rare, but allowed
        except OSError as exc:
            raise local_error(exc, "write", self._staged.shown) from exc  # type: ignore[union-attr]

    def end(self, record: FileRecord) -> None:
        if self._held is None:
            self._close()
            if self._digest is not None:
                check_hash(record, self._digest)
            return
        super().end(record)
        data = self._rewrite(record.path, b"".join(self._held), Path(self._staged.target))  # type: ignore[misc,union-attr]
        self._held, self._digest = None, None
        self._fd = self._open(self._staged)  # type: ignore[arg-type]
        self.data(memoryview(data))
        self._close()

    def _open(self, staged: Staged) -> int:
        try:
            return self._os_open(staged.name, self._FLAGS, 0o666, dir_fd=staged.dir_fd)
        except OSError as exc:
            raise local_error(exc, "write", staged.shown) from exc

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def abort(self) -> None:
        self._close()


#: Members this large are hashed by the reader thread when the caller writes (see Prefetch).
_WORKER_HASHES_FROM = 1 << 20


def _consume(stream: BinaryIO, settings: Settings, expected_digest: str | None, sink: _Hasher) -> Manifest:
    if expected_digest is not None:
        manifest.check_digest(expected_digest)
    large = _WORKER_HASHES_FROM if isinstance(sink, _Extractor) else None
    events = Prefetch(bundle_reader.events(stream, settings, expected_digest), share_hashing=True, large_member=large)
    man = None
    data, begin, end = sink.data, sink.begin, sink.end  # looked up once: this loop runs ~4 times a file
    try:
        for batch in events.batches():
            for kind, value in batch:
                if kind == DATA:
                    data(value)  # type: ignore[arg-type]
                elif kind == BEGIN:
                    begin(value)  # type: ignore[arg-type]
                elif kind == CHECKED_BEGIN:
                    begin(value, checked=True)  # type: ignore[arg-type]
                elif kind == END:
                    end(value)  # type: ignore[arg-type]
                elif kind == MANIFEST:
                    man = value
    finally:
        events.close()
    return man  # type: ignore[return-value]


def unpack(
    stream: BinaryIO,
    dest: Destination,
    *,
    expected_digest: str | None = None,
    settings: Settings | None = None,
    rewrite: Rewriter | None = None,
    ops: FileOps | None = None,
) -> Manifest:
    """Verify and extract a bundle read front to back from ``stream`` (no seeking needed).

    ``dest`` is a directory, or a mapping from a member's first path component to the directory
    that component unpacks into. Raises a :class:`BundleError` subclass, naming the member and the
    rule it broke, and leaves every destination as it was, if anything at all is wrong: a commit
    that fails midway (full disk, read-only folder) is undone, and a folder another process swaps
    for a link meanwhile cannot redirect a write (see :mod:`bundler.bundle.placement`).

    ``ops`` is the OS seam every staging write, rename and mkdir goes through; tests pass a
    :class:`~bundler.fileio.FileOps` subclass to fail or race on cue. Defaults to the real calls.
    """
    settings = settings or Settings.from_env()
    ops = ops or REAL_OPS
    placement = Placement(dest, ops=ops)
    sink = _Extractor(placement, rewrite, ops)
    try:
        man = _consume(stream, settings, expected_digest, sink)
        placement.commit()
        return man
    finally:
        sink.abort()
        placement.abort()


def verify(stream: BinaryIO, *, expected_digest: str | None = None, settings: Settings | None = None) -> Manifest:
    """Check a bundle completely, as ``unpack`` would, without writing anything."""
    return _consume(stream, settings or Settings.from_env(), expected_digest, _Hasher())


def read_manifest(stream: BinaryIO, *, settings: Settings | None = None) -> Manifest:
    """Only the manifest (the first member): cheap, for listing; does not verify the files."""
    return bundle_reader.read_manifest(stream, settings or Settings.from_env())


def iter_files(
    stream: BinaryIO, *, expected_digest: str | None = None, settings: Settings | None = None
) -> Iterator[tuple[FileRecord, bytes]]:
    """Each member with its bytes, in manifest (path) order, for small bundles inspected in memory.

    Nothing is yielded until the whole bundle verified (every hash, the end of the archive, no
    trailing data), so a caller never acts on a member of a bundle that turns out to be bad.
    The order is the manifest's whatever the format's order in the stream (``stream_order``).
    """
    if expected_digest is not None:
        manifest.check_digest(expected_digest)
    files: list[tuple[FileRecord, bytes]] = []
    pieces: list[bytes] = []
    for kind, value in bundle_reader.events(stream, settings or Settings.from_env(), expected_digest):
        if kind == BEGIN:
            pieces = []
        elif kind == DATA:
            pieces.append(bytes(value))  # type: ignore[arg-type]
        elif kind == END:
            data = b"".join(pieces)
            check_hash(value, hashlib.sha256(data))  # type: ignore[arg-type]
            files.append((value, data))  # type: ignore[arg-type]
    yield from sorted(files, key=lambda item: item[0].path)
