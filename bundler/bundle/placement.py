"""Putting verified files into a cache directory without ever exposing a partial bundle.

Steps, and why each exists:
1. Map each member to its target: ``dest`` is one root, or a mapping from a member's first path
   component to a root (a compile bundle spans the Triton cache and our autotune records).
2. Open each root once, by file descriptor. The root's own path is resolved once (``~/.cache``
   may well be a link to ``/data/cache``); nothing below it is ever looked up by path again.
3. Stage: bytes are written into a private (0700) ``.bundler-staging-<host>-<pid>-<random>``
   folder inside each root, laid out as they will land, so the final renames stay on one
   filesystem and are atomic.
4. Check every target before moving any: walk down to each target folder one component at a
   time with ``O_DIRECTORY | O_NOFOLLOW`` relative to its parent's descriptor. A link on the way
   is followed by us, component by component, only while it stays inside the root; one leading
   outside is refused, and so is a folder where a file goes. A refusal here leaves the root
   untouched.
5. Move with ``*at`` calls on those descriptors (``rename``/``replace`` with ``src_dir_fd`` and
   ``dst_dir_fd``, ``mkdir(dir_fd=)``), so a folder that another process swaps for a link after
   the check cannot redirect a single write: the descriptor still names the folder we checked.
   A top-level folder the root does not have yet (a fresh cache, or a kernel this node never
   compiled) moves with one ``rename`` of the whole staged subtree: 630 renames instead of 4,410
   for the benchmark corpus, and a rename never follows a link at its target. Those renames
   come first, before the per-file moves (why, and the limit it leaves: docs/design-notes.md).
   Everything else moves per file; a file it replaces is first hard-linked into staging, so the
   move can be undone, and readers still see either the old file or the complete new one.
6. Confirm: each folder written into must still be the one its parent names. A folder swapped
   meanwhile (the writes went into the real folder, wherever it now is) fails the unpack with
   :class:`UnsafeMemberError`, and everything is undone.
7. Undo on any failure (a full disk or quota, a read-only subfolder, exhausted inodes, a refusal,
   an exception): replaced files come back from staging, new files and folders this commit made
   are removed, whole-subtree renames are taken back. Then staging is removed. One limit: a
   bundle spanning more folders than the descriptors kept open (``_MAX_OPEN_FOLDERS``) may have
   let go of a folder that another process then moves away; that folder cannot be found by name
   again, so its files stay as placed (whole, inside whatever the other process made of it) and
   a warning says so. Nothing is written outside a root either way.

Two processes placing the same bundle both succeed, because identical files simply replace each
other and a subtree rename that loses the race falls back to per-file moves. Locks would only
save duplicate work (huggingface_hub's lesson: ``flock`` silently succeeds on some network
filesystems), so correctness never depends on one. (A staging folder's ``flock`` only tells a
sweep that its unpack is alive: a guard beside the pid in its name and the hour, see ``_hold``.)

What a SIGKILL in the middle of a commit can leave: the files moved so far (each one complete,
never a torn file, each either the old or the new version), folders the commit created, and the
staging folder holding the rest plus hard links to replaced files. No file outside the roots. The
caller's "unpacked" marker is written only after a commit returns, so the next pull unpacks the
bundle again and completes it; the next unpack into the same root on this host removes the dead
process's staging folder at once (its pid is in the name), others after an hour.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from bundler.errors import LocalCacheError, UnsafeMemberError
from bundler.fileio import HOST, REAL_OPS, FileOps, owner_is_gone

log = logging.getLogger(__name__)

STAGING_PREFIX = ".bundler-staging-"

Destination = Path | str | Mapping[str, Path | str]

#: Inside a staging folder: the staged tree, and hard links to files a commit replaced.
_TREE, _OLD = "t", "o"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: What ``open(O_NOFOLLOW)`` answers for a link (Linux, macOS: ELOOP; FreeBSD: EMLINK) or a file.
_NOT_A_FOLDER = {errno.ELOOP, errno.EMLINK, errno.ENOTDIR}
#: link() errors that mean "no hard link possible here", not "the name is taken".
_NO_LINKS = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}
#: Links followed inside one walk before giving up, as the kernel does (ELOOP).
_MAX_LINK_HOPS = 40
#: Folder descriptors kept open per root; beyond this the cache is emptied and reopened on demand
#: (identity-checked), so a bundle of thousands of kernels stays far below RLIMIT_NOFILE.
_MAX_OPEN_FOLDERS = 256


def local_error(exc: OSError, what: str, path: str) -> LocalCacheError:
    hint = {
        errno.ENOSPC: "the disk is full: free space or point the cache elsewhere",
        errno.EDQUOT: "the disk quota is exhausted: free space or point the cache elsewhere",
        errno.EROFS: "the filesystem is read-only: point the cache at a writable directory",
        errno.EACCES: "permission denied: fix the directory's permissions or use another cache directory",
        errno.EPERM: "permission denied: fix the directory's permissions or use another cache directory",
    }.get(exc.errno or 0, "check the cache directory")
    return LocalCacheError(f"could not {what} {path}: {exc.strerror or exc}; {hint}")


class Staged:
    """Where the bytes of one member go: ``name`` relative to the open folder ``dir_fd``.

    ``target`` (the final path, for a rewriter and for messages) and ``shown`` (the staging path,
    for messages) are joined only when asked for: nearly every member needs neither, and two path
    joins per member showed in unpack profiles of 1,600-file caches.
    """

    __slots__ = ("dir_fd", "name", "_root", "_staging")

    def __init__(self, dir_fd: int, name: str, root: str, staging: str) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self._root = root
        self._staging = staging

    @property
    def target(self) -> str:
        return os.path.join(self._root, self.name)

    @property
    def shown(self) -> str:
        return os.path.join(self._root, self._staging, _TREE, self.name)


class _Entry:
    """One file to move singly, as checked.

    A plain class: a ``typing.NamedTuple`` is built at import, 0.5 ms of every ``bundler unpack``.
    """

    __slots__ = ("root", "folder", "name", "rel", "old_mode")

    def __init__(self, root: _Root, folder: str, name: str, rel: str, old_mode: int | None) -> None:
        self.root = root
        self.folder = folder  # below the root, as the bundle names it ("" for the root itself)
        self.name = name
        self.rel = rel
        # st_mode of what it replaces, if anything: a regular file, or a link, FIFO, socket or
        # device a user keeps there (any of them is kept aside, so a failed commit puts it back)
        self.old_mode = old_mode


class Placement:
    """Stages the members of one bundle and moves them into place once all are verified."""

    def __init__(self, dest: Destination, *, ops: FileOps | None = None) -> None:
        # Absolute, normalised roots: "new/../x" must not need (or create) "new".
        if isinstance(dest, Mapping):
            self._roots: dict[str | None, str] = {k: os.path.abspath(v) for k, v in dest.items()}
        else:
            self._roots = {None: os.path.abspath(dest)}
        self._ops = ops or REAL_OPS
        self._open: dict[str, _Root] = {}  # root path -> its descriptors and staging
        # (root, first component, path below the root) of every staged file, in stream order
        self._moves: list[tuple[_Root, str, str]] = []
        self._touched = time.monotonic()
        self._committed = False
        self._where = ""

    def target(self, name: str) -> tuple[Path, Path]:
        """The root and final path of member ``name`` (already checked by manifest.check_path)."""
        root, rel = self._split(name)
        return Path(root), Path(root, rel)

    def _split(self, name: str) -> tuple[str, str]:
        # Plain strings on this per-file path: pathlib's overhead showed up in unpack profiles.
        if None in self._roots:
            return self._roots[None], name
        top, _, rest = name.partition("/")
        root = self._roots.get(top)
        if root is None or not rest:
            known = ", ".join(sorted(k for k in self._roots if k)) or "none"
            raise UnsafeMemberError(
                f"member {name!r} is outside the folders this bundle may unpack into ({known})"
            )
        return root, rest

    def stage(self, name: str) -> Staged:
        """Where to write member ``name`` now (a fresh name in staging), and its final target."""
        path, rel = self._split(name)
        root = self._open.get(path) or self._open_root(path)
        parent = rel.rpartition("/")[0]
        if parent and parent not in root.staged_dirs:
            try:
                root.make_staged_dir(parent)
            except OSError as exc:
                raise local_error(exc, "create a staging folder in", path) from exc
        self._moves.append((root, rel.partition("/")[0], rel))
        self.keep_alive()
        return Staged(root.tree_fd, rel, path, root.staging)

    def keep_alive(self) -> None:
        """Refresh the staging folders' mtime now and then, so no other process sweeps them.

        Another unpack into the same root removes staging folders untouched for an hour (left
        by a killed process on another host, or one whose pid was reused). Files staged in
        subfolders do not change the staging folder's own mtime, and one large member can
        stream for a long time, so the unpack says it is alive.
        """
        now = time.monotonic()
        if now - self._touched < _KEEP_ALIVE_SECONDS:
            return
        self._touched = now
        for root in self._open.values():
            try:
                os.utime(root.staging_fd)
            except OSError:
                continue  # the commit will report a vanished folder with a clear message

    def _open_root(self, path: str) -> _Root:
        root = _Root(path, self._ops)
        self._open[path] = root  # before opening: abort() closes whatever got opened
        try:
            root.open()
        except OSError as exc:
            raise local_error(exc, "create a staging folder in", path) from exc
        return root

    def commit(self) -> None:
        """Check every target, move all staged files into place, and undo it all on any failure."""
        journal: list[tuple] = []
        try:
            try:
                self._commit(journal)
            except BaseException:
                self._roll_back(journal)
                raise
        except OSError as exc:
            raise local_error(exc, "move a verified file into", self._where) from exc
        finally:
            self.abort()

    def _commit(self, journal: list[tuple]) -> None:
        whole, each = self._plan()
        entries = self._check(each)
        for root, top in whole:
            self._where = os.path.join(root.path, top)
            if self._move_subtree(root, top, journal):
                continue
            # Lost a race: another process (most likely placing this same bundle) made the
            # folder meanwhile. Merge file by file, checked like any existing folder; a refusal
            # now undoes the folders already moved, so it still leaves the roots as they were.
            entries.extend(self._check([m for m in self._moves if m[0] is root and m[1] == top]))
        self._move_files(entries, journal)
        self._confirm(journal)
        self._committed = True

    def _plan(self) -> tuple[list[tuple[_Root, str]], list[tuple[_Root, str, str]]]:
        """Top-level folders that can move whole (absent from their root), and files moved singly."""
        whole: dict[tuple[_Root, str], bool] = {}
        each = []
        for move in self._moves:
            root, top, rel = move
            if rel != top:  # inside a folder
                key = (root, top)
                if key not in whole:
                    whole[key] = not _lexists(top, root.fd)
                if whole[key]:
                    continue
            each.append(move)
        # Members arrive in the bundle's stream order (by extension since format 2), which visits a
        # folder once per file type; folder by folder keeps the descriptor cache warm on re-unpacks.
        each.sort(key=lambda move: (move[0].path, move[2]))
        return [key for key, absent in whole.items() if absent], each

    def _check(self, moves: list[tuple[_Root, str, str]]) -> list[_Entry]:
        """Every target folder reachable without leaving its root, no folder where a file goes."""
        entries = []
        last: tuple[_Root, str] | None = None
        fd: int | None = None
        for root, _top, rel in moves:
            folder, _, name = rel.rpartition("/")
            if (root, folder) != last:  # a descriptor is only good until the next open()
                last = (root, folder)
                found = root.folders.open(folder, create=False)
                fd = None if found is None else found[0]
            old_mode = None
            if fd is not None:  # else the rest of the way is created fresh, by us
                try:
                    mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                except FileNotFoundError:
                    mode = None
                if mode is not None and stat.S_ISDIR(mode):
                    raise UnsafeMemberError(
                        f"{os.path.join(root.path, rel)} is a directory, but the bundle has a file there"
                    )
                old_mode = mode
            entries.append(_Entry(root, folder, name, rel, old_mode))
        return entries

    def _move_subtree(self, root: _Root, top: str, journal: list[tuple]) -> bool:
        """One rename for a whole folder the root does not have; False if it appeared meanwhile.

        ``rename`` never follows a link at the target and fails on anything but an empty folder
        there, so this cannot write through whatever another process put in its place.
        """
        try:
            ident = _identity(os.stat(top, dir_fd=root.tree_fd, follow_symlinks=False))
            self._ops.rename(top, top, src_dir_fd=root.tree_fd, dst_dir_fd=root.fd)
        except FileNotFoundError:
            # Only we touch our staging folder; on a case-insensitive filesystem "K" and "k" are
            # one staged folder, already moved with its twin.
            if _isdir(top, root.fd):
                return True
            raise
        except OSError as exc:
            # Taken meanwhile (EEXIST, ENOTEMPTY, ENOTDIR, EISDIR), or a folder owned by another
            # user in a sticky shared root (EPERM, EACCES): the per-file path decides, and says why.
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.EPERM, errno.EACCES):
                return False
            raise
        journal.append(("tree", root, top, ident))
        return True

    def _move_files(self, entries: list[_Entry], journal: list[tuple]) -> None:
        staged_mode = None
        for entry in entries:
            root, name = entry.root, entry.name
            self._where = os.path.join(root.path, entry.rel)
            fd, real = root.folders.open(entry.folder, create=True, journal=journal)  # type: ignore[misc]
            if entry.old_mode is not None:
                # A replaced file keeps its privacy: never more open than it was, nor than the
                # umask makes a new file (a 0600 file stays 0600; a 0666 one becomes 0644).
                # A replaced link, FIFO or socket has no privacy to keep, only itself.
                if stat.S_ISREG(entry.old_mode):
                    if staged_mode is None:
                        staged_mode = stat.S_IMODE(os.stat(entry.rel, dir_fd=root.tree_fd).st_mode)
                    mode = staged_mode & stat.S_IMODE(entry.old_mode)
                    if mode != staged_mode:
                        self._ops.chmod(entry.rel, mode, dir_fd=root.tree_fd)
                kept = root.keep_old(fd, name)
                if kept is not None:
                    aside, linked = kept
                    # Moved aside, the name is empty: the old file goes back whatever happens
                    # next. Hard-linked, the name holds the old file, or whatever a concurrent
                    # unpack put there, until our replace succeeds: only then is it ours to undo.
                    if not linked:
                        journal.append(("old", root, real, name, aside))
                    self._ops.replace(entry.rel, name, src_dir_fd=root.tree_fd, dst_dir_fd=fd)
                    if linked:
                        journal.append(("old", root, real, name, aside))
                    continue
            self._ops.replace(entry.rel, name, src_dir_fd=root.tree_fd, dst_dir_fd=fd)
            journal.append(("new", root, real, name))

    def _confirm(self, journal: list[tuple]) -> None:
        """Each folder written into must still be the one its parent names (else: undo, refuse)."""
        for root in self._open.values():
            written = {e[2] for e in journal if e[0] in ("new", "old") and e[1] is root}
            root.folders.confirm(written)

    def _roll_back(self, journal: list[tuple]) -> None:
        """Undo a commit's moves, newest first; what cannot be undone is logged, never raised."""
        for entry in reversed(journal):
            kind, root = entry[0], entry[1]
            try:
                if kind == "tree":
                    _, _, top, ident = entry
                    if _identity(os.stat(top, dir_fd=root.fd, follow_symlinks=False)) == ident:
                        self._ops.rename(top, top, src_dir_fd=root.fd, dst_dir_fd=root.tree_fd)
                elif kind == "mkdir":
                    parent, _, name = entry[2].rpartition("/")
                    self._ops.rmdir(name, dir_fd=root.folders.reopen(parent))
                elif kind == "new":
                    self._ops.unlink(entry[3], dir_fd=root.folders.reopen(entry[2]))
                else:
                    _, _, real, name, aside = entry
                    self._ops.rename(aside, name, src_dir_fd=root.old_fd, dst_dir_fd=root.folders.reopen(real))
            except (OSError, UnsafeMemberError) as exc:
                log.warning("could not undo part of a failed unpack in %s (%s): %s", root.path, entry[2], exc)

    def abort(self) -> None:
        """Remove staging folders, and after a failure the folders we made; safe to call twice.

        After a rejected bundle the filesystem is exactly as before, down to the destination
        folder itself when it did not exist. Only folders this placement created are removed,
        and only while empty: a concurrent unpack may have started using one.
        """
        for root in self._open.values():
            root.close(remove_created=not self._committed)
        self._open.clear()


class _Root:
    """One destination root: its descriptor, its staging folder, the folders below it opened so far."""

    def __init__(self, path: str, ops: FileOps) -> None:
        self.path = path
        self.ops = ops
        self.fd = self.staging_fd = self.tree_fd = self.old_fd = -1
        self.real = path
        self.staging = ""
        self._staging_id: tuple[int, int] | None = None
        self.staged_dirs: set[str] = set()
        self.folders = _Folders(self)
        # (parent descriptor, name) of each folder on the way to the root that we created
        self._created: list[tuple[int, str]] = []
        self._held: list[int] = []  # parent descriptors kept for removing those
        self._aside = 0

    def open(self) -> None:
        """Open (creating if need be) the root, sweep abandoned staging, make our staging folder."""
        for attempt in range(5):
            self._open_root()
            _sweep_stale_staging(self.fd, self.path)
            try:
                self._make_staging()
                return
            except FileNotFoundError:
                # A concurrent unpack that created this root gave up and removed it (it was
                # empty) between our open and our mkdir, or a sweep took our fresh staging
                # folder for a dead process's (see _hold). Try again: it is ours to create now.
                os.close(self.fd)
                self.fd = -1
                if attempt == 4:
                    raise

    def _open_root(self) -> None:
        self.real = os.path.realpath(self.path)
        missing = []
        path = self.real
        while True:
            try:
                fd = os.open(path, _DIR_FLAGS)
                break
            except FileNotFoundError:
                parent = os.path.dirname(path)
                if parent == path:
                    raise
                missing.append(os.path.basename(path))
                path = parent
        try:
            for name in reversed(missing):
                try:
                    self.ops.mkdir(name, dir_fd=fd)
                    made = True
                except FileExistsError:
                    made = False  # another process made it meanwhile: not ours to remove
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if made:
                    self._created.append((fd, name))
                    self._held.append(fd)
                else:
                    os.close(fd)
                fd = child
        except BaseException:
            if fd not in self._held:
                os.close(fd)
            raise
        self.fd = fd

    def _make_staging(self) -> None:
        for _ in range(100):
            name = f"{STAGING_PREFIX}{HOST}-{os.getpid()}-{os.urandom(6).hex()}"
            try:
                self.ops.mkdir(name, 0o700, dir_fd=self.fd)
            except FileExistsError:
                continue
            break
        else:
            raise FileExistsError(errno.EEXIST, "no unused staging folder name", self.path)
        self.staging = name
        self.staging_fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        self._staging_id = _identity(os.fstat(self.staging_fd))
        try:
            _hold(self.staging_fd, os.path.join(self.path, name))
            self.ops.mkdir(_TREE, 0o700, dir_fd=self.staging_fd)
        except FileNotFoundError:  # a sweep took our fresh folder: open() makes another
            os.close(self.staging_fd)
            self.staging_fd, self.staging = -1, ""
            raise
        self.tree_fd = os.open(_TREE, _DIR_FLAGS, dir_fd=self.staging_fd)

    def make_staged_dir(self, rel: str) -> None:
        """``makedirs`` inside our private staging tree (no other user can enter it: 0700)."""
        try:
            self.ops.mkdir(rel, dir_fd=self.tree_fd)
        except FileNotFoundError:
            self.make_staged_dir(rel.rpartition("/")[0])
            self.ops.mkdir(rel, dir_fd=self.tree_fd)
        except FileExistsError:
            pass
        self.staged_dirs.add(rel)

    def keep_old(self, fd: int, name: str) -> tuple[str, bool] | None:
        """Keep the file about to be replaced, so a failed commit can put it back: its name in
        staging, and whether it was hard-linked there (True) or moved (False); None if it is gone.

        A hard link into staging keeps readers seeing a file at every moment. Where hard links
        are not possible the old file is moved aside instead (a brief gap for readers).
        """
        if self.old_fd < 0:
            self.ops.mkdir(_OLD, 0o700, dir_fd=self.staging_fd)
            self.old_fd = os.open(_OLD, _DIR_FLAGS, dir_fd=self.staging_fd)
        self._aside += 1
        aside = str(self._aside)
        try:
            self.ops.link(name, aside, src_dir_fd=fd, dst_dir_fd=self.old_fd, follow_symlinks=False)
            return aside, True
        except FileNotFoundError:
            return None  # gone meanwhile: nothing to keep
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            try:
                self.ops.rename(name, aside, src_dir_fd=fd, dst_dir_fd=self.old_fd)
            except FileNotFoundError:
                return None
        return aside, False

    def close(self, *, remove_created: bool) -> None:
        self.folders.close()
        self._remove_staging()
        if remove_created:
            for parent, name in reversed(self._created):
                try:
                    self.ops.rmdir(name, dir_fd=parent)
                except FileNotFoundError:
                    continue
                except OSError:
                    break  # not empty (files were placed, or another unpack uses it): leave it and its parents
        self._created.clear()
        for fd in (self.tree_fd, self.old_fd, self.staging_fd, self.fd, *self._held):
            if fd >= 0:
                os.close(fd)
        self.fd = self.staging_fd = self.tree_fd = self.old_fd = -1
        self._held.clear()

    def _remove_staging(self) -> None:
        """Remove our staging folder, and nothing else: not a folder put in its place meanwhile."""
        if not self.staging:
            return
        name, self.staging = self.staging, ""
        try:
            if _identity(os.stat(name, dir_fd=self.fd, follow_symlinks=False)) != self._staging_id:
                log.warning("%s is no longer our staging folder; leaving it", os.path.join(self.path, name))
                return
            # After a commit that moved whole folders it is already empty: three rmdirs spare
            # ``bundler unpack`` the import of shutil (bz2, lzma: ~2 ms per command).
            for sub in (_TREE, _OLD):
                try:
                    os.rmdir(sub, dir_fd=self.staging_fd)
                except FileNotFoundError:
                    continue
            os.rmdir(name, dir_fd=self.fd)
        except FileNotFoundError:
            return
        except OSError:
            _remove_tree(name, self.fd)


class _Folders:
    """Folders below one root, opened one component at a time without following links.

    Descriptors are cached by the folder's real path below the root (links resolved); the
    identity (device, inode) of every folder opened is remembered, so a folder reopened later
    (after the cache was emptied, or to undo) must be the very one that was checked.
    """

    def __init__(self, root: _Root) -> None:
        self._root = root
        self._fds: dict[str, int] = {}
        self._ids: dict[str, tuple[int, int]] = {}

    def open(self, folder: str, *, create: bool, follow: bool = True,
             journal: list[tuple] | None = None) -> tuple[int, str] | None:
        """The descriptor of ``folder`` and its real path below the root; None if it is missing
        (and not ``create``). Raises UnsafeMemberError for a link leading outside the root, a
        file where a folder belongs, or (``follow=False``) any link at all."""
        root = self._root
        if len(self._fds) > _MAX_OPEN_FOLDERS:
            self.close()
        pending = folder.split("/")[::-1] if folder else []
        real: list[str] = []
        fd = root.fd
        hops = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":  # only from a link's target
                if not real:
                    raise _outside(root, folder)
                real.pop()
                fd = self.reopen("/".join(real))
                continue
            key = "/".join((*real, part))
            cached = self._fds.get(key)
            if cached is not None:
                fd = cached
                real.append(part)
                continue
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    root.ops.mkdir(part, dir_fd=fd)
                    if journal is not None:
                        journal.append(("mkdir", root, key))
                except FileExistsError:
                    pass  # made meanwhile by another process: open it, checked like any other
                pending.append(part)
                continue
            except OSError as exc:
                if exc.errno not in _NOT_A_FOLDER:
                    raise
                shown = os.path.join(root.path, key)
                try:
                    link = os.readlink(part, dir_fd=fd)
                except OSError:
                    raise UnsafeMemberError(f"{shown} is a file, but the bundle needs a folder there") from None
                hops += 1
                if not follow:
                    raise _swapped(root, key) from None
                if hops > _MAX_LINK_HOPS:
                    raise UnsafeMemberError(f"{shown}: too many levels of links; remove the link loop") from None
                if os.path.isabs(link):
                    inside = _below(root, link)
                    if inside is None:
                        raise UnsafeMemberError(
                            f"{shown} is a link to {link}, outside {root.path}; refusing to write through "
                            "it. Remove the link from the cache directory"
                        ) from None
                    real, fd = [], root.fd
                    pending.extend(inside[::-1])
                else:
                    pending.extend(link.split("/")[::-1])
                continue
            ident = _identity(os.fstat(child))
            if self._ids.setdefault(key, ident) != ident:
                os.close(child)
                raise _swapped(root, key)
            self._fds[key] = child
            fd = child
            real.append(part)
        return fd, "/".join(real)

    def reopen(self, real: str) -> int:
        """A folder this placement opened before, by its real path: the same folder or an error."""
        if not real:
            return self._root.fd
        fd = self._fds.get(real)
        if fd is not None:
            return fd
        found = self.open(real, create=False, follow=False)
        if found is None:
            raise _swapped(self._root, real)
        return found[0]

    def confirm(self, written: set[str]) -> None:
        """Every written folder, and each one above it, is still named by its parent."""
        seen: set[str] = set()
        for real in sorted(written):
            parts = real.split("/") if real else []
            for i in range(1, len(parts) + 1):
                key = "/".join(parts[:i])
                if key in seen:
                    continue
                parent = self.reopen("/".join(parts[: i - 1]))
                try:
                    ident = _identity(os.stat(parts[i - 1], dir_fd=parent, follow_symlinks=False))
                except FileNotFoundError:
                    ident = None
                if ident != self._ids.get(key):
                    raise _swapped(self._root, key)
                seen.add(key)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _swapped(root: _Root, key: str) -> UnsafeMemberError:
    return UnsafeMemberError(
        f"{os.path.join(root.path, key)} was replaced (by a link or another folder) while this unpack "
        f"wrote into it; nothing was written outside {root.path} and the unpack was undone. Another "
        "process is changing the cache directory: check who can write to it"
    )


def _outside(root: _Root, folder: str) -> UnsafeMemberError:
    return UnsafeMemberError(
        f"{os.path.join(root.path, folder)} leads through a link outside {root.path}; refusing to write "
        "through it. Remove the link from the cache directory"
    )


def _below(root: _Root, link: str) -> list[str] | None:
    """The components of absolute ``link`` below the root, or None if it points elsewhere."""
    target = os.path.normpath(link)
    for base in (root.real, root.path):
        if target == base:
            return []
        if target.startswith(base.rstrip(os.sep) + os.sep):
            return target[len(base.rstrip(os.sep)) + 1 :].split(os.sep)
    return None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _isdir(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _remove_tree(name: str, dir_fd: int) -> None:
    """Remove a staging folder: shutil's descriptor-based rmtree never follows a link inside."""
    import shutil

    shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=True)


#: Staging folders older than this were left by a killed process (OOM, SIGKILL) and are removed.
STALE_STAGING_SECONDS = 3600
#: How often a live unpack refreshes its staging folders' mtime (well under the above).
_KEEP_ALIVE_SECONDS = 60
#: This host, as it appears in staging folder names: letters, digits, '.' and '_' only.


def _abandoned(name: str, mtime: float, cutoff: float) -> bool:
    """Left by a process that is gone: a dead pid on this host at once, anything else after an hour.

    Hosts sharing one cache (a network filesystem) cannot see each other's processes, and a pid
    can be reused, so the hour stays the rule for everything this host cannot rule out.
    """
    parts = name[len(STAGING_PREFIX) :].split("-")
    return (len(parts) == 3 and owner_is_gone(parts)) or mtime < cutoff


def _sweep_stale_staging(root_fd: int, root: str) -> None:
    cutoff = time.time() - STALE_STAGING_SECONDS
    try:
        with os.scandir(root_fd) as entries:
            stale = [
                e.name for e in entries
                if e.name.startswith(STAGING_PREFIX) and e.is_dir(follow_symlinks=False)
                and _abandoned(e.name, e.stat(follow_symlinks=False).st_mtime, cutoff)
            ]
    except OSError:
        return
    for name in stale:
        fd = _claim(name, root_fd)
        if fd is None:
            continue
        try:
            log.info("removing %s, left behind by an interrupted unpack", os.path.join(root, name))
            _remove_tree(name, root_fd)
        finally:
            os.close(fd)


def _hold(fd: int, shown: str) -> None:
    """Lock our new staging folder for as long as this unpack keeps it open (its lifetime).

    The pid in the folder's name cannot tell a live owner from a dead one across pid namespaces
    (containers of one host name sharing a cache: hostNetwork pods, a shared hostPath or NFS
    cache), so :func:`_claim` takes the lock before a sweep: a held lock is a live owner.
    Where ``flock`` does not work (some network filesystems refuse it on a folder) the name
    and the hour rule stay the only guards, as before. The lock is taken before anything is
    staged; if a sweep got there first (it took our fresh folder for a dead process's), the
    folder is being removed and this unpack makes another.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FileNotFoundError(errno.ENOENT, "staging folder taken by a sweep", shown) from None
    except OSError:
        return


def _claim(name: str, root_fd: int) -> int | None:
    """A descriptor of abandoned-looking staging folder ``name`` holding its lock, or None when
    its unpack is alive (it holds the lock: see :func:`_hold`) or it is gone already."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=root_fd)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass  # no locks here: the name and the hour decide, as they did
    return fd
