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
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from bundler.errors import AccessDeniedError, ConfigError, NotFoundError, StoreError
from bundler.fileio import FileOps
from bundler.progress import NULL_PROGRESS, Progress
from bundler.stores.base import ObjectInfo, Store
from bundler.stores.streams import ChunkReader

logger = logging.getLogger(__name__)

#: Temp files and create-only claims start with this; keys may not (see :func:`key_path`).
_HIDDEN = "."
_COPY_CHUNK = 1 << 20
# link() errors that mean "this filesystem has no hard links", not "the name is taken".
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


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

    @classmethod
    def from_url(cls, url: str) -> LocalStore:
        """``file:///abs/path`` (``file://localhost/...`` too) or a plain path, relative or not."""
        parts = urlsplit(url)
        if parts.scheme != "file":
            return cls(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ConfigError(
                f"{url!r} is not a local directory URL: use file:///absolute/path (no host, no query)"
            )
        return cls(unquote(parts.path))

    # --- reading -------------------------------------------------------------------------------

    def open_read(self, key: str, *, progress: Progress = NULL_PROGRESS) -> BinaryIO:
        path = key_path(self.root, key)
        try:
            file = path.open("rb")
            size = os.fstat(file.fileno()).st_size
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"{key!r} not found in {self.url}") from None
        except PermissionError as exc:
            raise AccessDeniedError(
                f"cannot read {key!r} in {self.url}: {exc.strerror}; check permissions"
            ) from exc
        return _FileReader(file, progress, size).buffered()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = key_path(self.root, key).stat()
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
                    found.append((key, os.stat(os.path.join(dirpath, name))))
                except FileNotFoundError:  # deleted while we walked
                    continue
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
        2. fsync before publishing: a crash never leaves a published file with missing bytes;
        3. publish with ``link`` for create-only writes (fails with EEXIST when another writer won,
           race-free), with ``replace`` otherwise;
        4. the temp file is removed whatever happens, so a full disk leaves nothing behind.
        """
        path = key_path(self.root, key)
        tmp = path.with_name(f"{_HIDDEN}tmp-{secrets.token_hex(8)}-{path.name}")
        progress.start(total=size)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
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
        try:
            self._ops.link(str(tmp), str(path))
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            logger.debug("no hard links under %s (%s); create-only write uses a claim file", self.root, exc)
            return self._publish_with_claim(tmp, path)
        _fsync_dir(path.parent)
        return True

    def _publish_with_claim(self, tmp: Path, path: Path) -> bool:
        """Create-only publish for filesystems without hard links (some FUSE, SMB and FAT mounts).

        An ``O_EXCL`` claim file serialises the writers of one key: the claim holder publishes
        unless the key already exists; a writer that finds the claim taken reports "already there",
        because the holder's temp file is complete before it claims. If the holder crashes between
        claiming and publishing, its claim stays behind and must be removed by hand.
        """
        claim = path.with_name(f"{_HIDDEN}claim-{path.name}")
        try:
            os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            return False
        try:
            if path.exists():
                return False
            self._ops.replace(str(tmp), str(path))
            _fsync_dir(path.parent)
            return True
        finally:
            claim.unlink()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            key_path(self.root, key).unlink()


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
