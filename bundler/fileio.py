"""Writing a file so that readers see all of it or none of it.

Cache files are read by other processes at any moment (eight ranks of a node, a compile worker),
so every small file kernel-bundler writes into a cache goes through here: a private temp file in
the same folder (so the rename stays on one filesystem), then ``os.replace``. File permissions
follow the umask, as an ordinary ``open`` would, not ``mkstemp``'s 0600.

:class:`FileOps` is the seam between our file-writing code and the operating system (s3transfer's
``OSUtils``): the local store and bundle placement make every write, rename and mkdir through it,
so a test can make one call fail on cue (a full disk at the k-th file) or act as a racing process
between a check and a move, without patching ``os`` for the whole process.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

DirFd = int | None


class FileOps:
    """The OS calls that write cache files, as a seam tests subclass to fail or race on cue.

    Each method is the ``os`` function of the same name with the same arguments; ``dir_fd``
    arguments make the call relative to an open folder, which is how placement avoids following
    a link another process may swap in after a check. Keep it thin: no logic belongs here.
    """

    # The two calls made per unpacked member are the os functions themselves: no Python frame.
    open = staticmethod(os.open)
    write = staticmethod(os.write)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def mkdir(self, path: str, mode: int = 0o777, *, dir_fd: DirFd = None) -> None:
        os.mkdir(path, mode, dir_fd=dir_fd)

    def rmdir(self, path: str, *, dir_fd: DirFd = None) -> None:
        os.rmdir(path, dir_fd=dir_fd)

    def unlink(self, path: str, *, dir_fd: DirFd = None) -> None:
        os.unlink(path, dir_fd=dir_fd)

    def chmod(self, path: str, mode: int, *, dir_fd: DirFd = None) -> None:
        os.chmod(path, mode, dir_fd=dir_fd)

    def link(
        self, src: str, dst: str, *, src_dir_fd: DirFd = None, dst_dir_fd: DirFd = None,
        follow_symlinks: bool = True,
    ) -> None:
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow_symlinks)

    def rename(self, src: str, dst: str, *, src_dir_fd: DirFd = None, dst_dir_fd: DirFd = None) -> None:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def replace(self, src: str, dst: str, *, src_dir_fd: DirFd = None, dst_dir_fd: DirFd = None) -> None:
        os.replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


#: The real thing, shared: FileOps holds no state.
REAL_OPS = FileOps()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path``, complete, when the block ends without error.

    The temp file is created with ``O_EXCL`` and mode 0666, so the kernel applies the umask:
    changing the process umask to read it (as a ``mkstemp`` + ``fchmod`` version would) races
    with every other thread creating files and folders at that moment.
    """
    target = Path(path)
    # os.urandom(8).hex() is what secrets.token_hex(8) returns; importing secrets costs ~4 ms per command.
    tmp = target.with_name(f".{target.name}.{os.urandom(8).hex()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """``data`` at ``path``, all or nothing; creates the parent folder. Raises OSError."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        f.write(data)


_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.")


#: How a file that must be a plain file is opened for reading: never through a link at its name
#: (a link planted in a shared folder could make this process read anything it may read), and
#: without waiting for a FIFO's writer, which would block forever. Regular files ignore
#: ``O_NONBLOCK``, so reads of them behave as usual.
_REGULAR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotARegularFile(Exception):
    """Something other than a regular file is at the path: a folder, FIFO, socket or device."""

    def __init__(self, mode: int) -> None:
        super().__init__(mode)
        self.mode = mode


def open_regular(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """A read-only descriptor on the regular file at ``path``, and its ``fstat`` (what is checked
    is what is read). A link at ``path`` fails as ``open`` does under ``O_NOFOLLOW`` (ELOOP; ENXIO
    for a socket); anything else that is no regular file raises :class:`NotARegularFile`, with the
    descriptor closed. The descriptor is the caller's to close.
    """
    fd = os.open(path, _REGULAR_FLAGS)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotARegularFile(st.st_mode)
    return fd, st


def host_tag(nodename: str) -> str:
    """``nodename`` as it appears in the names of temp and staging files: safe in a file name, free
    of ``-`` (the names are split on it), and one-to-one, so no two hosts get the same tag.

    Letters, digits and ``.`` stay; ``_`` becomes ``__``; every other byte of the UTF-8 name
    becomes ``_`` and two hex digits (``gpu-1`` -> ``gpu_2d1``, ``gpu_1`` -> ``gpu__1``: replacing
    both with ``_`` made them one host, so each could sweep the other's live staging folders).
    A tag over 64 characters keeps 47 of them and a hash of the whole name.
    """
    tag = "".join(
        chr(b) if b in _PLAIN else "__" if b == 0x5F else f"_{b:02x}"
        for b in nodename.encode("utf-8", "surrogateescape")
    )
    if len(tag) > 64:
        import hashlib

        tag = f"{tag[:47]}.{hashlib.sha256(nodename.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
    return tag or "host"


#: This host's name as it appears in the names of temp and staging files (see :func:`host_tag`).
HOST = host_tag(os.uname().nodename)


def owner_is_gone(name_parts: list[str]) -> bool:
    """Whether a leftover named ``<host>-<pid>-...`` (already split on ``-``) was made by a process
    that no longer runs on this host. Anything this host cannot rule out (another host's file, a
    live pid, one owned by another user, an old-style name) counts as alive: callers fall back to
    an age rule, since hosts sharing a folder cannot see each other's processes.
    """
    if len(name_parts) < 3 or name_parts[0] != HOST or not name_parts[1].isdigit():
        return False
    pid = int(name_parts[1])
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, owned by another user
    return False
