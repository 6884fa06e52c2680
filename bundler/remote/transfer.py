"""Push and pull bundles: archive + store + refs, and nothing else.

Push packs into a spool (the digest is known only once everything is hashed), then uploads with a
create-only write, so many CI jobs pushing the same bundle produce one object and no error. Pull
streams the object straight into ``archive.unpack``: no temp copy of the bundle, verification
while the bytes arrive, nothing visible until all of it checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from bundler import keys
from bundler.bundle import archive
from bundler.bundle import manifest as manifest_format
from bundler.bundle import reader as bundle_reader
from bundler.bundle.manifest import Manifest
from bundler.bundle.placement import Destination, Placement
from bundler.config import Settings
from bundler.errors import BundleError, ConfigError, NotFoundError, ObjectReplacedError
from bundler.fileio import FileOps, NotARegularFile, open_regular, write_atomically
from bundler.progress import NULL_PROGRESS, Progress
from bundler.remote import layout, refs
from bundler.remote.refs import Ref, read_ref
from bundler.stores.base import ObjectInfo, Store

log = logging.getLogger(__name__)

_SPOOL_IN_MEMORY = 64 << 20
_COPY_CHUNK = 1 << 20

#: A push that finds its bundle already stored rewrites it when the object is older than this, so
#: its date is fresh and ``bundler gc`` (whose grace period must exceed this; 1 h by default) cannot
#: delete it as unreferenced between this push's check and its ref write. A re-push of the same
#: bytes within the window uploads nothing.
REFRESH_AFTER_S = 600.0


@dataclasses.dataclass(frozen=True)
class PushResult:
    digest: str
    size: int
    uploaded: bool
    manifest: Manifest
    ref: Ref | None = None


@dataclasses.dataclass(frozen=True)
class PullResult:
    digest: str
    manifest: Manifest
    ref: Ref | None = None


def _resolve(store: Store, digest: str | None, ref: str | None, settings: Settings) -> tuple[str, Ref | None]:
    if (digest is None) == (ref is None):
        raise ConfigError("give exactly one of a bundle digest or a ref name")
    if ref is not None:
        found = read_ref(store, ref, settings)
        return found.digest, found
    return layout.check_digest(digest), None  # type: ignore[arg-type]


@contextlib.contextmanager
def _bundle_of(store: Store, found: Ref | None, digest: str) -> Iterator[None]:
    """A ref whose bundle is gone says so: the ref is the object the user named, and the fix is
    to push it again (a plain "bundles/<digest> not found" leaves them guessing why)."""
    try:
        yield
    except NotFoundError as exc:
        if found is None:
            raise
        raise NotFoundError(
            f"ref {found.name} points at bundle {digest}, which is not in the store {store.url} (deleted by gc "
            "or by hand); push the ref again"
        ) from exc


def upload(
    store: Store,
    stream: BinaryIO,
    digest: str,
    size: int,
    *,
    settings: Settings | None = None,
    progress: Progress = NULL_PROGRESS,
) -> bool:
    """Create the bundle object unless an intact one exists; True when this call uploaded it.

    Create-only writes alone would make a damaged object permanent: every node would download it,
    warn and compile, and every push would find the key taken. So an object already there is
    checked first, cheaply: its size, and (up to ``multipart_threshold`` bytes) its manifest
    against the digest in its key. A damaged one is replaced; concurrent writers replacing it
    write the same bytes, so the race is harmless.
    """
    settings = settings or Settings.from_env()
    key = layout.bundle_key(digest)
    found = store.head(key)
    damage = None
    if found is not None:
        try:
            damage = _damage(store, key, digest, found.size, size, settings)
        except NotFoundError:  # deleted since the head (a concurrent gc): create it, as if absent
            found = None
    if found is not None:
        if damage is None and not _stale(found):
            log.info("bundle %s already in %s; not uploading", digest, store.url)
            return False
        if damage is None:
            log.info("bundle %s already in %s but dated %s; rewriting it so gc sees it as new", digest,
                     store.url, found.modified)
            store.write(key, stream, size=size, progress=progress)
            return True
        log.warning("bundle %s in %s is damaged (%s); replacing it", key, store.url, damage)
        store.write(key, stream, size=size, progress=progress)
        return True
    created = store.write(key, stream, size=size, if_absent=True, progress=progress)
    if not created:
        log.info("bundle %s was uploaded by another writer meanwhile", digest)
    return created


def _stale(found: ObjectInfo) -> bool:
    """Whether a stored bundle is old enough that gc could be deleting it as unreferenced right now."""
    if found.modified is None:
        return False
    age = dt.datetime.now(dt.timezone.utc) - found.modified
    return age.total_seconds() > REFRESH_AFTER_S


def stored_and_fresh(store: Store, digest: str) -> bool:
    """Whether bundle ``digest`` is in the store and young enough that gc spares it while a new ref
    is written to name it (a caller linking an existing bundle instead of pushing it again)."""
    found = store.head(layout.bundle_key(digest))
    return found is not None and not _stale(found)


def run_facts() -> dict[str, Any]:
    """Who made a ref, for ``bundler ls`` / ``show``: host, command, time, device, versions.

    Stored in the ref's ``extra`` (the manifest's producer facts hold the versions that decide the
    digest; these describe one run and must not change it). Cheap: reads no GPU unless torch is
    already imported.
    """
    import socket
    import sys

    command = " ".join(sys.argv) if sys.argv and sys.argv[0] else ""
    return {
        "host": socket.gethostname(),
        "command": command[:500] or "(embedded interpreter)",
        "pushed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device(),
        "versions": keys.producer_facts(),
    }


def _device() -> str:
    import sys

    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
        return "cpu (Triton interpreter)"
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001 - a fact for display only
        pass
    return "unknown"


def _damage(store: Store, key: str, digest: str, stored: int, expected: int, settings: Settings) -> str | None:
    """Why the object at ``key`` is not the bundle ``digest`` of ``expected`` bytes, or None."""
    if stored != expected:
        return f"{stored} bytes, not {expected}"
    if stored > settings.multipart_threshold:
        return None  # reading its head would start a parallel download: the size has to do
    try:
        with store.open_read(key) as existing:
            bundle_reader.read_manifest(existing, settings, digest)
    except BundleError as exc:
        return str(exc).splitlines()[0][:120]
    return None


def push(
    store: Store,
    source: archive.Source,
    *,
    ref: str | None = None,
    ref_extra: Mapping[str, Any] | None = None,
    producer: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    progress: Progress = NULL_PROGRESS,
) -> PushResult:
    """Pack ``source``, upload it under its digest, and optionally point ``ref`` at it.

    The ref's ``extra`` records who made it (:func:`run_facts`), the file count and unpacked bytes,
    then ``ref_extra`` (the caller's facts win). An already stored bundle that is old is rewritten
    (see :data:`REFRESH_AFTER_S`), so a concurrent ``bundler gc`` cannot delete it under the ref.
    """
    settings = settings or Settings.from_env()
    if ref is not None:
        _check_can_write_ref(ref, settings)
    if producer is None:
        producer = keys.producer_facts()
    with archive.packed(source, settings=settings, producer=producer) as (packed, stream):
        uploaded = upload(store, stream, packed.digest, packed.compressed_size, settings=settings, progress=progress)
    written = None
    if ref is not None:
        extra = {**run_facts(), "files": len(packed.manifest.files), "bytes": packed.manifest.total_size,
                 **(ref_extra or {})}
        written = refs.write_ref(
            store, ref, packed.digest, packed.compressed_size,
            producer=packed.manifest.producer, extra=extra, settings=settings,
        )
        if store.head(layout.bundle_key(packed.digest)) is None:
            # Deleted between our upload check and the ref write (a `bundler gc` that listed the
            # store before the ref existed): put it back, so the ref never names a missing bundle.
            log.warning("bundle %s vanished while ref %s was written (a concurrent gc?); uploading it again",
                        packed.digest[:12], ref)
            with archive.packed(source, settings=settings, producer=producer) as (again, stream):
                uploaded = upload(store, stream, again.digest, again.compressed_size, settings=settings)
    return PushResult(packed.digest, packed.compressed_size, uploaded, packed.manifest, written)


def _check_can_write_ref(ref: str, settings: Settings) -> None:
    """Refuse before uploading anything when the ref could not be written afterwards: a bad name,
    or a node that holds only public keys (every other reader would refuse its unsigned ref)."""
    from bundler.remote import signing

    layout.check_name(ref)
    keys = signing.keyring(settings)
    if keys.enabled:
        keys.require_signer()


def pull(
    store: Store,
    dest: Destination,
    *,
    digest: str | None = None,
    ref: str | None = None,
    settings: Settings | None = None,
    rewrite: archive.Rewriter | None = None,
    progress: Progress = NULL_PROGRESS,
    node_state: Path | None = None,
    ops: FileOps | None = None,
) -> PullResult:
    """Stream a bundle from the store into ``dest``, verifying every byte against its digest.

    ``node_state``: a folder shared by the processes of one machine (the 8 ranks of a node start
    together). With it, one process downloads while the others wait on a file lock, then find the
    bundle already in place and download nothing. The lock only saves work: correctness never
    depends on it (unpacking is atomic per file), so a filesystem where locks silently succeed
    costs duplicate downloads, not broken caches.

    ``ops``: the OS seam the unpack writes through (:class:`bundler.fileio.FileOps`); tests pass
    one that fills the disk or races at a chosen call.
    """
    settings = settings or Settings.from_env()
    digest, found = _resolve(store, digest, ref, settings)
    if node_state is None:
        with _bundle_of(store, found, digest):
            return PullResult(digest, _download(store, dest, digest, found, settings, rewrite, progress, ops), found)
    with _bundle_of(store, found, digest), _node_lock(node_state / f"{digest}.lock", max(1.0, settings.pull_budget)):
        done = node_state / f"{digest}.manifest.json"
        man = _already_unpacked(done, digest, dest, settings, rewrite)
        if man is not None:
            log.info("bundle %s already unpacked on this machine; not downloading it again", digest)
            return PullResult(digest, man, found)
        man = _download(store, dest, digest, found, settings, rewrite, progress, ops)
        _record_unpacked(done, man)
        return PullResult(digest, man, found)


#: Seconds between attempts to take a node lock another process holds.
_LOCK_POLL_S = 0.05


@contextlib.contextmanager
def _node_lock(path: Path, wait: float) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` for the block, if possible; yields whether it is held.

    The lock only saves work (the block is correct without it), so nothing here can fail a pull:
    any OSError (a read-only or full state folder, a filesystem without locks) means pulling
    without it, and a lock held past ``wait`` seconds means downloading anyway. The state folder
    is private to this tool, so anything at ``path`` that is not a regular file (a link planted
    to truncate or block on something else, a FIFO) is removed, never opened through.
    """
    fd = None
    try:
        fd = _open_lock_file(path)
        deadline_at = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline_at:
                    log.warning("another process has held %s for %.0f s; downloading anyway", path, wait)
                    os.close(fd)
                    fd = None
                    break
                time.sleep(_LOCK_POLL_S)
    except OSError as exc:
        log.info("pulling without the node lock %s (%s); another process may download it too", path, exc)
        if fd is not None:
            os.close(fd)
            fd = None
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock


def _open_lock_file(path: Path) -> int:
    """The lock file's descriptor, opened without following a link; a non-file there is removed once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for attempt in range(2):
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EMLINK, errno.ENXIO) or attempt:
                raise
        else:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
            if attempt:
                raise OSError(errno.EINVAL, f"{path} is not a regular file")
        log.warning("removing %s: the node lock must be a regular file, something else was there", path)
        _remove_entry(path)
    raise AssertionError("unreachable")


def _remove_entry(path: Path) -> None:
    """Remove a link, a special file or a folder at ``path`` (the name only, never what it points to)."""
    try:
        path.unlink()
    except IsADirectoryError:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


#: Downloads of one bundle restarted because the object was rewritten mid-read, before giving up.
_RESTARTS_ON_REPLACED = 2


def _download(store: Store, dest: Destination, digest: str, found: Ref | None, settings: Settings,
              rewrite: archive.Rewriter | None, progress: Progress, ops: FileOps | None = None) -> Manifest:
    """Download, verify and unpack; start over if the bundle object is rewritten meanwhile.

    A push that finds its bundle old rewrites it (same bytes) so gc sees it fresh, and the rewrite
    can carry a new ETag (another part size, SSE-KMS). The ranged GETs of a large download are
    pinned to the first ETag, so they fail with ObjectReplacedError although the content is the
    same: the key is content-addressed and the unpack checks every byte against the digest, so
    reading the new object from the start is safe, and the failed attempt left nothing in place.
    """
    key = layout.bundle_key(digest)
    for restart in range(_RESTARTS_ON_REPLACED + 1):
        try:
            with store.open_read(key, progress=progress) as stream:
                man = archive.unpack(stream, dest, expected_digest=digest, settings=settings, rewrite=rewrite,
                                     ops=ops)
            break
        except ObjectReplacedError as exc:
            if restart == _RESTARTS_ON_REPLACED:
                raise
            log.info("bundle %s was rewritten in %s while it downloaded (%s); downloading it again",
                     digest, store.url, exc)
    log.info("pulled bundle %s: %d files, %d bytes", digest, len(man.files), man.total_size)
    return man


def _read_marker(done: Path, limit: int) -> bytes | None:
    """The "unpacked" marker's bytes, or None when it is missing, too large or not a regular file.

    Opened with ``O_NOFOLLOW | O_NONBLOCK``: a link planted there must not make this process read
    (or block forever on) something else, and a FIFO must not hang the pull.
    """
    try:
        fd, found = open_regular(done)
    except (OSError, NotARegularFile):
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit + 1) if found.st_size <= limit else None


def _record_unpacked(done: Path, man: Manifest) -> None:
    try:
        if os.path.islink(done) or (os.path.lexists(done) and not os.path.isfile(done)):
            _remove_entry(done)  # a planted link or folder: replace it with the marker
        write_atomically(done, man.encode())
    except OSError as exc:
        log.debug("could not record %s (%s); the next process downloads again", done, exc)


def _already_unpacked(
    done: Path, digest: str, dest: Destination, settings: Settings, rewrite: archive.Rewriter | None
) -> Manifest | None:
    """The manifest of an earlier unpack on this machine, if every one of its files is still there.

    "There" means the right size too (files the rewriter changes excepted): an empty file left by
    a power loss must send the next process to the store, not make every process skip it.
    """
    try:
        data = _read_marker(done, settings.max_manifest_bytes)
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            return None
        man = manifest_format.decode(data, max_members=settings.max_members)
        placement = Placement(dest)
        for record in man.files:
            found = placement.target(record.path)[1].stat()
            rewritten = rewrite is not None and rewrite.wants(record.path)
            if not stat.S_ISREG(found.st_mode) or (not rewritten and found.st_size != record.size):
                return None
        return man
    except (OSError, BundleError):
        pass
    return None


class _Tee:
    """Copies everything read from ``stream`` into ``out``: export verifies while it saves."""

    def __init__(self, stream: BinaryIO, out: BinaryIO) -> None:
        self._stream, self._out = stream, out

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._out.write(data)
        return data

    def readinto(self, buffer) -> int:  # zstandard prefers readinto when present
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _verify_copying(
    stream: BinaryIO, out: BinaryIO, settings: Settings, expected_digest: str | None = None
) -> Manifest:
    """Verify the bundle in ``stream`` completely while copying every byte of it to ``out``."""
    tee = _Tee(stream, out)
    man = archive.verify(tee, expected_digest=expected_digest, settings=settings)
    while tee.read(_COPY_CHUNK):  # anything after the verified part (a little padding at most)
        pass
    return man


def export(
    store: Store,
    out: BinaryIO,
    *,
    digest: str | None = None,
    ref: str | None = None,
    settings: Settings | None = None,
    progress: Progress = NULL_PROGRESS,
) -> Manifest:
    """Save a bundle to ``out`` for an offline transfer, verifying it on the way.

    A ref that needs more bundles than its own (a torch ref's precompiled headers, named in its
    ``extra.bundles``) gets one warning per bundle, with the command that exports it: the file
    written here holds the ref's own bundle only.
    """
    settings = settings or Settings.from_env()
    digest, found = _resolve(store, digest, ref, settings)
    linked = refs.linked_bundles(found.extra, found.producer) if found is not None else {}
    for layer, other in sorted(linked.items()):
        log.warning("ref %s also needs bundle %s (%s); export it too (bundler export --digest %s) and import "
                    "it without a ref", ref, other, layer, other)
    with _bundle_of(store, found, digest), store.open_read(layout.bundle_key(digest), progress=progress) as stream:
        return _verify_copying(stream, out, settings, expected_digest=digest)


def import_file(
    store: Store,
    path: str,
    *,
    ref: str | None = None,
    settings: Settings | None = None,
    progress: Progress = NULL_PROGRESS,
) -> PushResult:
    """Verify an offline bundle file completely, then upload it (and point ``ref`` at it).

    The bytes are copied into a private spool while they are verified, and the spool is what gets
    uploaded: a file changed between the check and the upload cannot slip unverified bytes under
    an immutable, content-addressed key.
    """
    settings = settings or Settings.from_env()
    if ref is not None:
        _check_can_write_ref(ref, settings)
    with open(path, "rb") as f, tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
        man = _verify_copying(f, spool, settings)
        size = spool.tell()
        spool.seek(0)
        uploaded = upload(store, spool, man.digest, size, settings=settings, progress=progress)
    written = None
    if ref is not None:
        extra = {**run_facts(), "files": len(man.files), "bytes": man.total_size, "imported_from": Path(path).name}
        written = refs.write_ref(store, ref, man.digest, size, producer=man.producer, extra=extra, settings=settings)
    return PushResult(man.digest, size, uploaded, man, written)


@dataclasses.dataclass(frozen=True)
class Listing:
    refs: list[tuple[str, ObjectInfo]]
    bundles: list[tuple[str, ObjectInfo]]


def list_remote(store: Store) -> Listing:
    """Refs and bundles in the store, each with its object's size and date."""
    return Listing(
        refs=list(_named(store.list(layout.REFS), layout.ref_name_from_key)),
        bundles=list(_named(store.list(layout.BUNDLES), layout.digest_from_bundle_key)),
    )


def _named(infos: Iterator[ObjectInfo], name_of) -> Iterator[tuple[str, ObjectInfo]]:
    for info in infos:
        name = name_of(info.key)
        if name is not None:
            yield name, info
