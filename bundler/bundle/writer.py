"""Writing bundles: a directory (or named files and bytes) into a deterministic zstd tar.

The manifest must be the first member but needs every file's hash. Rather than read each file
twice, members are compressed (and hashed in the same read) into a spool; then a separate zstd
frame holding the manifest is written, followed by the spooled frame. Concatenated frames are one
valid zstd stream, so ``tar --zstd``, ``zstd -d`` and our reader all see one tar.

Members follow the manifest's stream order (:func:`manifest.stream_order`: extension, then path),
the order the reader requires of a bundle of format :data:`manifest.FORMAT_VERSION`, which is the
one written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import zstandard

from bundler.bundle import manifest, tarformat
from bundler.bundle.manifest import MANIFEST_NAME, FileRecord, Manifest
from bundler.bundle.placement import STAGING_PREFIX
from bundler.config import Settings
from bundler.errors import BundlerError, LimitExceededError, LocalFileNotFoundError, UnsafeMemberError
from bundler.fileio import NotARegularFile, open_regular
from bundler.frozen import Frozen

Source = Path | str | Mapping[str, Path | str | bytes]
#: One member to pack: its name, its bytes or the path of the file holding them, and for a file
#: found by walking a directory the (st_dev, st_ino) the walk saw there (None for named files).
_Item = tuple[str, str | bytes, tuple[int, int] | None]

_CHUNK = 1 << 20
#: Compressed member data is spooled in memory up to this size while the manifest is computed.
_SPOOL_IN_MEMORY = 256 << 20
#: zstd job size: fixed, so long-distance matching stays parallel and output does not depend on
#: the number of threads.
_JOB_SIZE = 16 << 20
#: Writes reach zstd in batches of this size (see _Spool).
_BATCH = 1 << 20
#: Long-distance matching keeps 2**N candidates per hash bucket; zstd's default (4) made LDM cost
#: three times plain level 3 on a max-autotune-shaped cache, whose repeats are long and exact.
#: With 2 it cost half as much CPU for 2-4% more bytes there, within 1% on real caches
#: (benchmarks/README.md, session 3).
_LDM_BUCKET_LOG = 2


class PackResult(Frozen):
    """What ``pack`` made: the bundle's digest, its manifest and its size in bytes."""

    _fields = ("digest", "manifest", "compressed_size")
    digest: str
    manifest: Manifest
    compressed_size: int

    def __init__(self, digest: str, manifest: Manifest, compressed_size: int) -> None:
        object.__setattr__(self, "digest", digest)
        object.__setattr__(self, "manifest", manifest)
        object.__setattr__(self, "compressed_size", compressed_size)


def _collect(source: Source, settings: Settings) -> list[_Item]:
    """The members to pack in stream order, refused up front when a reader with these settings
    would refuse them.

    Names go through the reader's own :func:`manifest.check_path` (depth, component and total
    length, UTF-8), so ``pack`` never writes a bundle that ``unpack`` cannot place.
    """
    if isinstance(source, Mapping):
        items: list[_Item] = [
            (name, data if isinstance(data, bytes) else os.fspath(data), None) for name, data in source.items()
        ]
    else:
        items = list(_walk(Path(source)))
    for name, origin, _ in items:
        try:
            manifest.check_path(name)
        except UnsafeMemberError as exc:
            where = origin if isinstance(origin, str) else "the given bytes"
            raise UnsafeMemberError(f"cannot pack {where}: {exc}") from None
    if len(items) > settings.max_members:
        raise LimitExceededError(
            f"cannot pack {len(items)} files: readers accept at most {settings.max_members} "
            "(BUNDLER_MAX_MEMBERS); split the cache or raise the limit everywhere it is read"
        )
    items.sort(key=lambda item: manifest.stream_key(item[0]))
    return items


def _walk(root: Path) -> Iterator[_Item]:
    """Every regular file under ``root`` as (relative posix name, path, (st_dev, st_ino)), via
    scandir's cached types.

    pathlib per file cost as much as compressing a small cache; DirEntry answers is-it-a-link,
    is-it-a-file and the inode number from the directory listing itself on Linux. Each folder is
    opened with ``O_NOFOLLOW`` and must be the folder its parent listed (device and inode), so a
    folder swapped for a link while the walk runs is refused rather than listed; ``_put_file``
    then opens only the very file the walk saw, so a swap after the walk cannot redirect a read
    either. That costs an open per folder, not a ``stat`` per file (which cost 2-3% of a pack).
    A folder or file that is a mount point (another device) is refused the same way.
    """
    if not root.is_dir():
        if not root.exists():
            raise LocalFileNotFoundError(f"cannot pack {root}: no such directory")
        raise BundlerError(f"cannot pack {root}: not a directory")
    pending: list[tuple[str, str, tuple[int, int] | None]] = [(os.fspath(root), "", None)]
    while pending:
        folder, prefix, expect = pending.pop()
        # The root itself may be a link (a cache folder configured through one); nothing below it.
        try:
            fd = os.open(folder, _DIR_FLAGS if expect is not None else _DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link or a file since listed
                raise UnsafeMemberError(_replaced_message(folder)) from None
            raise BundlerError(f"cannot list {folder} to pack it: {exc.strerror or exc}") from exc
        try:
            st = os.fstat(fd)
            if expect is not None and (st.st_dev, st.st_ino) != expect:
                raise UnsafeMemberError(_replaced_message(folder))
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = prefix + entry.name
                    path = os.path.join(folder, entry.name)
                    if entry.is_symlink():
                        raise UnsafeMemberError(_link_message(Path(path)))
                    if entry.is_dir():
                        if not entry.name.startswith(STAGING_PREFIX):
                            pending.append((path, name + "/", (st.st_dev, entry.inode())))
                    elif entry.is_file():
                        yield name, path, (st.st_dev, entry.inode())
                    else:
                        raise UnsafeMemberError(_not_regular_message(path))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeMemberError(_link_message(Path(folder))) from None
            raise BundlerError(f"cannot list {folder} to pack it: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _replaced_message(path: str) -> str:
    return (
        f"cannot pack {path}: it is not the file found there when the folder was listed (it, or a "
        "folder above it, was replaced: by a link, or by another process; or it is a mount point); "
        "pack again once the cache is quiet"
    )


def _link_message(path: Path) -> str:
    return (
        f"cannot pack {path}: it is a symbolic link and bundles hold regular files only; "
        "copy the target in place of the link or remove it"
    )


class _Spool:
    """One reused buffer of ``_BATCH`` bytes between the files and zstd's stream writer.

    Headers, padding and file bytes (read straight into it with ``readv``) go in; it is written
    to zstd whenever it fills, and zstd takes a copy. Thousands of small writes cost more in
    stream-writer calls than the compression itself, and fresh memory cost more still: reading
    each file into new bytes, then joining batches into new bytes again, touched every 4 KiB
    page twice (a page fault each; 30 MB of FX-graph entry alone is 15,000).
    """

    def __init__(self, writer: BinaryIO) -> None:
        self._writer = writer
        self._view = memoryview(bytearray(_BATCH))
        self._pos = 0

    def put(self, data: bytes) -> None:
        if len(data) > len(self._view) - self._pos:
            self.flush()
            if len(data) >= len(self._view):
                self._writer.write(data)
                return
        self._view[self._pos : self._pos + len(data)] = data
        self._pos += len(data)

    def free(self) -> memoryview:
        """The unused rest of the buffer (never empty): fill some of it, then ``advance``."""
        if self._pos == len(self._view):
            self.flush()
        return self._view[self._pos :]

    def advance(self, n: int) -> None:
        self._pos += n

    def flush(self) -> None:
        if self._pos:
            self._writer.write(self._view[: self._pos])
            self._pos = 0


def _open_source(origin: str, name: str, expect: tuple[int, int] | None) -> tuple[int, int]:
    """An open descriptor on the regular file at ``origin`` and its size; the same policy for
    files named by a mapping as for files a directory walk found.

    :func:`bundler.fileio.open_regular` opens it: never through a link at its name (a link planted
    in a shared cache would pack its target, ``~/.ssh/id_rsa`` say, into a bundle others pull),
    without waiting on a FIFO's writer, and only a regular file. For a walked file the
    descriptor's (st_dev, st_ino) must also be the walk's: a folder on the path swapped for a
    link since the walk, or the file replaced, is refused. The descriptor is the caller's to close.
    """
    try:
        fd, st = open_regular(origin)
    except NotARegularFile:
        raise UnsafeMemberError(_not_regular_message(origin)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeMemberError(_link_message(Path(origin))) from None
        raise BundlerError(f"cannot read {origin} to pack it as {name!r}: {exc.strerror or exc}") from exc
    if expect is not None and (st.st_dev, st.st_ino) != expect:
        os.close(fd)
        raise UnsafeMemberError(_replaced_message(origin))
    return fd, st.st_size


def _not_regular_message(path: str) -> str:
    return f"cannot pack {path}: not a regular file (bundles hold regular files only)"


def _put_file(origin: str, name: str, out: _Spool, expect: tuple[int, int] | None = None) -> tuple[int, hashlib._Hash]:
    """Header and bytes of one source file into ``out``: its size and sha256, the file read once.

    The file is opened by :func:`_open_source`. Each read asks for one byte more than the size
    the header promised, so a file that grew while it was read is an error (the header is
    already written), as is one that shrank. A short read ends the file (regular files come back
    short only there), so a small file takes one ``readv``.
    """
    fd, size = _open_source(origin, name, expect)
    try:
        out.put(tarformat.file_header(name, size))
        digest = hashlib.sha256()
        remaining = size
        while True:
            free = out.free()
            want = min(remaining + 1, len(free))
            n = _read(os.readv, origin, name, fd, [free[:want]])
            if n > remaining or (n == 0 and remaining):
                raise _changed(origin)
            if n == 0:
                break
            digest.update(free[:n])
            out.advance(n)
            remaining -= n
            if remaining == 0 and n < want:
                break  # asked for a byte past the promised end, and there was none
        return size, digest
    finally:
        os.close(fd)


def _read(call, origin: str, name: str, *args):  # noqa: ANN001, ANN002, ANN202 - os.fstat or os.readv
    """``call(*args)``, its OSError told as a source file that cannot be read (writes to the
    spool fail on their own terms)."""
    try:
        return call(*args)
    except OSError as exc:
        raise BundlerError(f"cannot read {origin} to pack it as {name!r}: {exc.strerror or exc}") from exc


def _changed(origin: str) -> BundlerError:
    return BundlerError(f"{origin} changed size while it was being packed; pack again once the cache is quiet")


def _write_members(items: list[_Item], writer: BinaryIO, max_bytes: int) -> list[FileRecord]:
    """Stream every member into ``writer`` while hashing it: each file is read exactly once."""
    records = []
    total = 0
    out = _Spool(writer)
    for name, origin, expect in items:
        if isinstance(origin, bytes):
            size, digest = len(origin), hashlib.sha256(origin)
            out.put(tarformat.file_header(name, size))
            out.put(origin)
        else:
            size, digest = _put_file(origin, name, out, expect)
        out.put(_ZEROS[: tarformat.padding(size)])
        records.append(FileRecord(name, size, digest.hexdigest()))
        total += size
        if total > max_bytes:
            raise LimitExceededError(
                f"cannot pack: the files add up to over {max_bytes} bytes (at {name!r}), more than readers "
                "accept (BUNDLER_MAX_BUNDLE_BYTES); split the cache or raise the limit everywhere it is read"
            )
    out.put(tarformat.END_OF_ARCHIVE)
    out.flush()
    return records


_ZEROS = bytes(tarformat.BLOCK)


def compressor(settings: Settings) -> zstandard.ZstdCompressor:
    """zstd at the configured level with long-distance matching, so far-apart repeats compress.

    Real caches repeat kernels inside Inductor's FX-graph pickles, far apart: ``--long=27`` made
    the H200 caches 2.6x smaller. The default window is 16 MiB, not 128: a reader's cost grows
    with the window (see ``Settings.long_window_log``). A fixed 16 MiB job size keeps long matching
    parallel (zstd would otherwise make one job of the whole window) and makes the output
    independent of the number of threads, so every machine produces the same bytes.
    """
    long = (
        {"enable_ldm": True, "window_log": settings.long_window_log, "ldm_bucket_size_log": _LDM_BUCKET_LOG}
        if settings.long_window_log
        else {}
    )
    params = zstandard.ZstdCompressionParameters.from_level(
        settings.zstd_level,
        threads=settings.zstd_threads or os.cpu_count() or 1,
        job_size=_JOB_SIZE,
        write_checksum=True,
        **long,
    )
    return zstandard.ZstdCompressor(compression_params=params)


class _Chained(io.RawIOBase):
    """The manifest frame, then the spooled member frame, read as one stream (no copy of either)."""

    def __init__(self, head: bytes, body: BinaryIO) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._body.readinto(buffer)


@contextlib.contextmanager
def packed(
    source: Source,
    *,
    settings: Settings | None = None,
    producer: Mapping[str, str] | None = None,
) -> Iterator[tuple[PackResult, BinaryIO]]:
    """Pack ``source`` and hold the bundle as a stream to read once (to a file, or to a store).

    The manifest must come first but needs every file's hash, so the members are compressed (and
    hashed, in one read) into a spool first; the bundle is then a separate zstd frame holding the
    manifest followed by the spooled frame. Concatenated frames are one valid zstd stream. Pushing
    reads the stream straight from the spool: the compressed bytes are never copied again.
    """
    settings = settings or Settings.from_env()
    items = _collect(source, settings)
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as body:
        writer = compressor(settings).stream_writer(body, closefd=False)
        records = _write_members(items, writer, settings.max_bundle_bytes)
        writer.close()
        man = manifest.build(records, producer or {})
        encoded = man.encode()
        manifest.check_fits(man, len(encoded), settings)
        head = compressor(settings).compress(
            tarformat.file_header(MANIFEST_NAME, len(encoded)) + encoded + bytes(tarformat.padding(len(encoded)))
        )
        size = len(head) + body.tell()
        body.seek(0)
        stream = io.BufferedReader(_Chained(head, body), buffer_size=_CHUNK)
        yield PackResult(digest=man.digest, manifest=man, compressed_size=size), stream  # type: ignore[misc]


def pack(
    source: Source,
    out: BinaryIO,
    *,
    settings: Settings | None = None,
    producer: Mapping[str, str] | None = None,
) -> PackResult:
    """Write a bundle of ``source`` (a directory, or arcname -> path or bytes) to ``out``.

    The output is byte-identical for the same files and producer facts, whatever the order of
    discovery, mtimes or owners. ``out`` receives a partial stream if this raises: callers that
    write files write to a temporary name and rename.
    """
    with packed(source, settings=settings, producer=producer) as (result, stream):
        shutil.copyfileobj(stream, out, _CHUNK)
    return result


