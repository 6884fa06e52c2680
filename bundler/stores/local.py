"""A store over a local (or network-mounted) directory: keys are relative file paths.

Used for air-gapped clusters, shared filesystems and tests. Correctness comes from per-writer temp
files and atomic renames, never from locks (``flock`` silently succeeds on some network
filesystems): a reader sees either no file or the whole file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from bundler.config import redact_url
from bundler.errors import AccessDeniedError, ConfigError, NotFoundError, StoreError
from bundler.fileio import HOST, FileOps, NotARegularFile, open_regular, owner_is_gone
from bundler.progress import NULL_PROGRESS, Progress
from bundler.stores.base import ObjectInfo, Store
from bundler.stores.streams import ChunkReader

logger = logging.getLogger(__name__)

#: Temp files start with this; keys may not (see :func:`key_path`).
_HIDDEN = "."
_TMP_PREFIX = f"{_HIDDEN}tmp-"
#: Temp files older than this were left by a killed writer (on any host) and are removed.
STALE_TEMP_SECONDS = 3600
#: A temp file of a dead pid on this host is removed once it is this old: a live writer's file
#: changes as it writes, and the age also covers hosts that share a name but not their pids
#: (containers of one pod).
_DEAD_WRITER_GRACE_S = 60
_SWEEP_EVERY_S = 60.0
#: This host, as it appears in temp file names: letters, digits, '.' and '_' only.
_COPY_CHUNK = 1 << 20
# link() errors that mean "this filesystem has no hard links", not "the name is taken".
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}
# open() errors that mean "something is at the key, but no file": a link under O_NOFOLLOW (ELOOP on
# Linux, EMLINK on the BSDs), a socket (ENXIO).
_NOT_A_FILE_ERRNOS = {errno.ELOOP, errno.EMLINK, errno.ENXIO}
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))


def key_path(root: Path, key: str) -> Path:
    """The file for ``key`` under ``root``; the one place a key becomes a path.

    Rejects what could escape ``root`` or alias another key: absolute keys, backslashes (a path
    separator on Windows shares), NUL, empty segments, and segments starting with ``.`` (which
    covers ``.`` and ``..`` and keeps our temp-file names out of the key space).
    """
    segments = key.split("/")
    bad = (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\0" in key
        or any(not s or s.startswith(_HIDDEN) for s in segments)
    )
    if bad:
        raise ConfigError(
            f"key {key!r} is not a valid store key: use '/'-separated relative names with no empty, "
            "'.' or '..' segments, no leading '/', no backslashes and no segment starting with '.'"
        )
    return root.joinpath(*segments)


class _FileReader(ChunkReader):
    def __init__(self, file: BinaryIO, progress: Progress, total: int) -> None:
        super().__init__(progress, total)
        self._file = file

    def _next_chunk(self) -> bytes:
        return self._file.read(_COPY_CHUNK)

    def _release(self) -> None:
        self._file.close()


class LocalStore(Store):
    """Objects as files under ``root``, laid out exactly like the bucket (``v1/bundles/...``)."""

    def __init__(self, root: str | os.PathLike[str], *, ops: FileOps | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()
        self._ops = ops or FileOps()
        self._swept: dict[Path, float] = {}  # folder -> when this store last swept it (monotonic)

    @classmethod
    def from_url(cls, url: str) -> LocalStore:
        """``file:///abs/path`` (``file://localhost/...`` too) or a plain path, relative or not."""
        parts = urlsplit(url)
        if parts.scheme != "file":
            return cls(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ConfigError(
                f"{redact_url(url)!r} is not a local directory URL: use file:///absolute/path (no host, no query)"
            )
        return cls(unquote(parts.path))

    # --- reading -------------------------------------------------------------------------------

    def open_read(self, key: str, *, progress: Progress = NULL_PROGRESS) -> BinaryIO:
        file, size = self._open_object(key)
        return _FileReader(file, progress, size).buffered()

    def _open_object(self, key: str) -> tuple[BinaryIO, int]:
        """The open file of ``key`` and its size; anything but a plain file reads as missing.

        :func:`bundler.fileio.open_regular` opens it: a FIFO at a key must not block the reader
        forever, and writes publish files by rename, never links, so a link at a key is no object
        of ours (following it could read anything this process may read). Anything but a regular
        file is a NotFoundError, as :meth:`head` says (None), naming the path so someone can
        remove it; a miss, so it never trips a store's breaker.
        """
        path = key_path(self.root, key)
        try:
            fd, st = open_regular(path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{key!r} not found in {self.url}") from None
        except NotARegularFile as exc:
            raise _not_a_file(key, self.url, path, _kind_of(exc.mode)) from None
        except PermissionError as exc:
            raise AccessDeniedError(
                f"cannot read {key!r} in {self.url}: {exc.strerror}; check permissions"
            ) from exc
        except OSError as exc:
            if exc.errno in _NOT_A_FILE_ERRNOS:
                raise _not_a_file(key, self.url, path, _kind(path)) from None
            raise StoreError(f"cannot read {key!r} in {self.url} ({path}): {exc.strerror or exc}") from exc
        return os.fdopen(fd, "rb"), st.st_size

    def head(self, key: str) -> ObjectInfo | None:
        """Like :meth:`open_read`: a link, folder, FIFO, socket or device at ``key`` is no object."""
        try:
            st = os.lstat(key_path(self.root, key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _info(key, st) if stat.S_ISREG(st.st_mode) else None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only below the deepest folder the prefix names; filter the rest by string prefix.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root.joinpath(*folder.split("/")) if folder else self.root
        found: list[tuple[str, os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(_HIDDEN)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if name.startswith(_HIDDEN) or not key.startswith(prefix):
                    continue
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:  # deleted while we walked
                    continue
                if stat.S_ISREG(st.st_mode):  # what open_read would refuse is no object (see head)
                    found.append((key, st))
        for key, st in sorted(found, key=lambda item: item[0]):
            yield _info(key, st)

    # --- writing -------------------------------------------------------------------------------

    def write(
        self,
        key: str,
        stream: BinaryIO,
        *,
        size: int | None = None,
        if_absent: bool = False,
        progress: Progress = NULL_PROGRESS,
    ) -> bool:
        """Copy to a temp file beside the target, fsync, then publish it in one atomic step.

        Steps, and why:
        1. temp file in the target's folder: same filesystem, so publishing is a rename, not a copy;
           its name carries this host and pid, so a later writer can tell a killed writer's leftover
           from a live one's file (:func:`_abandoned_temp`) and sweeps it;
        2. fsync before publishing: a crash never leaves a published file with missing bytes;
        3. publish with ``link`` for create-only writes (fails with EEXIST when another writer won,
           race-free), with ``replace`` otherwise;
        4. the temp file is removed whatever happens, so a full disk leaves nothing behind.
        """
        path = key_path(self.root, key)
        tmp = path.with_name(f"{_TMP_PREFIX}{HOST}-{os.getpid()}-{secrets.token_hex(8)}-{path.name}")
        progress.start(total=size)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._sweep(path.parent)
            self._copy_to(tmp, stream, progress)
            if if_absent:
                return self._publish_if_absent(tmp, path)
            self._ops.replace(str(tmp), str(path))
            _fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise _write_error(exc, key, self.url) from exc
        finally:
            progress.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _copy_to(self, tmp: Path, stream: BinaryIO, progress: Progress) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            while chunk := stream.read(_COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[self._ops.write(fd, view) :]
                progress.update(len(chunk))
            self._ops.fsync(fd)
        finally:
            os.close(fd)

    def _publish_if_absent(self, tmp: Path, path: Path) -> bool:
        """Create-only publish: ``link`` where the filesystem has hard links, else check-then-replace.

        Without hard links (some FUSE, SMB and FAT mounts) there is no race-free create-only
        rename, and no lock is used instead: a lock file left by a crash would make every later
        create-only write answer "already there" while the object is missing. Two writers that
        both find the key absent may then both publish. Create-only writes are for
        content-addressed keys (bundles, Triton files), where both write the same bytes and each
        reader sees one whole file either way. A FIFO, socket, device or link at the key holds no
        object (:meth:`head` says None), so it is replaced rather than taken for one.
        """
        try:
            self._ops.link(str(tmp), str(path))
        except FileExistsError:
            if not _holds_no_object(path):
                return False
            # A FIFO, socket, device or link reads as missing (head), so the key is free: replace it.
            self._ops.replace(str(tmp), str(path))
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            logger.debug("no hard links under %s (%s); create-only write checks, then replaces", self.root, exc)
            if os.path.lexists(path) and not _holds_no_object(path):
                return False
            self._ops.replace(str(tmp), str(path))
        _fsync_dir(path.parent)
        return True

    def _sweep(self, folder: Path) -> None:
        """Remove temp files that killed writers left in ``folder`` (at most once a minute per folder).

        A SIGKILL between creating a temp file and publishing it leaves the file behind; nothing
        else ever removes it. Best effort: a failure here never fails the write.
        """
        now = time.monotonic()
        if now - self._swept.get(folder, -math.inf) < _SWEEP_EVERY_S:
            return
        self._swept[folder] = now
        cutoff = time.time() - STALE_TEMP_SECONDS
        try:
            with os.scandir(folder) as entries:
                stale = [
                    e.name for e in entries
                    if e.name.startswith(_TMP_PREFIX) and not e.is_dir(follow_symlinks=False)
                    and _abandoned_temp(e.name, e.stat(follow_symlinks=False).st_mtime, cutoff)
                ]
        except OSError:
            return
        for name in stale:
            logger.info("removing %s, left behind by an interrupted write", folder / name)
            with contextlib.suppress(OSError):
                os.unlink(folder / name)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            key_path(self.root, key).unlink()


def _abandoned_temp(name: str, mtime: float, cutoff: float) -> bool:
    """Left by a writer that is gone: a dead pid on this host (after a short grace), else after an hour.

    Hosts sharing one store folder cannot see each other's processes, and a pid can be reused, so
    the hour stays the rule for everything this host cannot rule out.
    """
    parts = name[len(_TMP_PREFIX) :].split("-", 3)
    if len(parts) == 4 and mtime < time.time() - _DEAD_WRITER_GRACE_S and owner_is_gone(parts):
        return True
    return mtime < cutoff


def _holds_no_object(path: Path) -> bool:
    """Something other than a file or folder is at ``path`` (a rename can replace it, not a folder)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False  # removed meanwhile: link again would race; the caller's answer stands
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _not_a_file(key: str, url: str, path: Path, kind: str) -> NotFoundError:
    return NotFoundError(
        f"{key!r} not found in {url}: {path} is {kind}, not a file kernel-bundler wrote, so the key reads "
        "as missing; remove it (nothing of ours is lost)"
    )


def _kind(path: Path) -> str:
    try:
        return _kind_of(os.lstat(path).st_mode)
    except OSError:
        return "not a regular file"


def _kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(
        key=key, size=st.st_size, modified=dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc)
    )


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some filesystems cannot open folders, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(exc: OSError, key: str, url: str) -> StoreError:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AccessDeniedError(
            f"cannot write {key!r} in {url}: {exc.strerror}; make the folder writable for this user "
            "or point --remote / BUNDLER_REMOTE at one that is"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(
            f"cannot write {key!r} in {url}: {exc.strerror}; free space (or raise the quota) there, "
            "nothing partial was left behind"
        )
    return StoreError(f"cannot write {key!r} in {url}: {exc}")
