"""Putting verified files into a cache directory without ever exposing a partial bundle.

Steps, and why each exists:
1. Map each member to its target: ``dest`` is one root, or a mapping from a member's first path
   component to a root (a compile bundle spans the Triton cache and our autotune records).
2. Stage: bytes are written into a private ``.bundler-staging-*`` folder inside each root, laid
   out as they will land, so the final renames stay on one filesystem and are atomic.
3. Check every target before moving any: no existing symlink on the way may lead outside the
   root, and no directory may sit where a file goes. A refusal here leaves the root untouched.
4. Move. A top-level folder the root does not have yet (a fresh cache, or a kernel this node
   never compiled) moves with one ``rename`` of the whole staged subtree: 630 renames instead of
   4,410 for the benchmark corpus, and no per-file checks, since nothing there can be a link.
   Everything else moves with ``os.replace`` per file. Readers see either the old file or the
   complete new one; two processes placing the same bundle both succeed, because identical files
   simply replace each other and a subtree rename that loses the race falls back to per-file
   moves. Locks would only save duplicate work (huggingface_hub's lesson: ``flock`` silently
   succeeds on some network filesystems), so correctness never depends on one.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from bundler.errors import LocalCacheError, UnsafeMemberError

log = logging.getLogger(__name__)

STAGING_PREFIX = ".bundler-staging-"

Destination = Path | str | Mapping[str, Path | str]


def local_error(exc: OSError, what: str, path: str) -> LocalCacheError:
    hint = {
        errno.ENOSPC: "the disk is full: free space or point the cache elsewhere",
        errno.EDQUOT: "the disk quota is exhausted: free space or point the cache elsewhere",
        errno.EROFS: "the filesystem is read-only: point the cache at a writable directory",
        errno.EACCES: "permission denied: fix the directory's permissions or use another cache directory",
        errno.EPERM: "permission denied: fix the directory's permissions or use another cache directory",
    }.get(exc.errno or 0, "check the cache directory")
    return LocalCacheError(f"could not {what} {path}: {exc.strerror or exc}; {hint}")


class Placement:
    """Stages the members of one bundle and moves them into place once all are verified."""

    def __init__(self, dest: Destination) -> None:
        # Absolute, normalised roots: "new/../x" must not need (or create) "new".
        if isinstance(dest, Mapping):
            self._roots: dict[str | None, str] = {k: os.path.abspath(v) for k, v in dest.items()}
        else:
            self._roots = {None: os.path.abspath(dest)}
        self._staging: dict[str, str] = {}  # root -> its staging folder
        self._staged_dirs: set[str] = set()
        self._created: list[str] = []  # folders this placement made, outermost first
        # (root, first component, path below the root) of every staged file, in stream order
        self._moves: list[tuple[str, str, str]] = []
        self._touched = time.monotonic()

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

    def stage(self, name: str) -> tuple[str, str]:
        """A fresh staging path for member ``name``, and its final target."""
        root, rel = self._split(name)
        staging = self._staging.get(root) or self._new_staging(root)
        staged = os.path.join(staging, rel)
        parent = os.path.dirname(staged)
        if parent not in self._staged_dirs:
            try:
                _make_folder(parent)
            except OSError as exc:
                raise local_error(exc, "create a staging folder in", root) from exc
            self._staged_dirs.add(parent)
        self._moves.append((root, rel.partition("/")[0], rel))
        self.keep_alive()
        return staged, os.path.join(root, rel)

    def keep_alive(self) -> None:
        """Refresh the staging folders' mtime now and then, so no other process sweeps them.

        Another unpack into the same root removes staging folders untouched for an hour (left
        by a killed process). Files staged in subfolders do not change the staging folder's own
        mtime, and one large member can stream for a long time, so the unpack says it is alive.
        """
        now = time.monotonic()
        if now - self._touched < _KEEP_ALIVE_SECONDS:
            return
        self._touched = now
        for staging in self._staging.values():
            try:
                os.utime(staging)
            except OSError:
                continue  # the commit will report a vanished folder with a clear message

    def _new_staging(self, root: str) -> str:
        try:
            self._make_root(root)
            _sweep_stale_staging(root)
            staging = _make_staging(root)
        except OSError as exc:
            raise local_error(exc, "create a staging folder in", root) from exc
        self._staging[root] = staging
        self._staged_dirs.add(staging)
        return staging

    def commit(self) -> None:
        """Check every target, then move all staged files into place."""
        whole, each = self._plan()
        self._check_targets(each)
        moved: list[tuple[str, str]] = []
        target = ""
        try:
            for root, top in whole:
                target = os.path.join(root, top)
                if self._move_subtree(root, top):
                    moved.append((root, top))
                    continue
                # Lost a race: another process (most likely placing this same bundle) made the
                # folder meanwhile. Merge file by file, checked like any existing folder; if the
                # check refuses, take back the folders already moved, so a refusal still leaves
                # the roots as they were.
                group = [m for m in self._moves if m[0] == root and m[1] == top]
                try:
                    self._check_targets(group)
                except UnsafeMemberError:
                    self._move_back(moved)
                    raise
                each.extend(group)
            made: set[str] = set()
            for root, _top, rel in each:
                target = os.path.join(root, rel)
                parent = os.path.dirname(target)
                if parent not in made:
                    _make_folder(parent)
                    made.add(parent)
                os.replace(os.path.join(self._staging[root], rel), target)
        except OSError as exc:
            raise local_error(exc, "move a verified file into", target) from exc
        finally:
            self.abort()

    def _plan(self) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
        """Top-level folders that can move whole (absent from their root), and files moved singly."""
        whole: dict[tuple[str, str], bool] = {}
        each = []
        for move in self._moves:
            root, top, rel = move
            if rel != top:  # inside a folder
                key = (root, top)
                if key not in whole:
                    whole[key] = not os.path.lexists(os.path.join(root, top))
                if whole[key]:
                    continue
            each.append(move)
        return [key for key, absent in whole.items() if absent], each

    def _move_subtree(self, root: str, top: str) -> bool:
        """One rename for a whole folder the root does not have; False if it appeared meanwhile.

        ``rename`` never follows a link at the target and fails on anything but an empty folder
        there, so this cannot write through whatever another process put in its place.
        """
        target = os.path.join(root, top)
        try:
            os.rename(os.path.join(self._staging[root], top), target)
        except FileNotFoundError:
            # Only we touch our staging folder; on a case-insensitive filesystem "K" and "k" are
            # one staged folder, already moved with its twin.
            if os.path.isdir(target):
                return True
            raise
        except OSError as exc:
            # Taken meanwhile (EEXIST, ENOTEMPTY, ENOTDIR, EISDIR), or a folder owned by another
            # user in a sticky shared root (EPERM, EACCES): the per-file path decides, and says why.
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.EPERM, errno.EACCES):
                return False
            raise
        return True

    def _move_back(self, moved: list[tuple[str, str]]) -> None:
        """Return folders this commit moved into place to staging (which is then removed)."""
        for root, top in reversed(moved):
            try:
                os.rename(os.path.join(root, top), os.path.join(self._staging[root], top))
            except OSError as exc:
                log.warning("could not take back %s after a refused unpack: %s", os.path.join(root, top), exc)

    def abort(self) -> None:
        """Remove staging folders, and folders we made that stayed empty; safe to call twice.

        After a rejected bundle the filesystem is exactly as before, down to the destination
        folder itself when it did not exist.
        """
        for staging in self._staging.values():
            _remove_tree(staging)
        self._staging.clear()
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                continue
            except OSError:
                break  # not empty (files were placed): leave it and its parents
        self._created.clear()

    def _make_root(self, root: str) -> None:
        """Create ``root`` one folder at a time, remembering exactly the folders this call made."""
        for folder in _missing_folders(root):
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue  # another process made it meanwhile: not ours to remove
            self._created.append(folder)

    def _check_targets(self, moves: list[tuple[str, str, str]]) -> None:
        real_roots = {root: os.path.realpath(root) for root in {m[0] for m in moves}}
        checked: set[str] = set()
        for root, _top, rel in moves:
            target = os.path.join(root, rel)
            parent = os.path.dirname(target)
            if parent not in checked:
                _check_parent(root, real_roots[root], parent)
                checked.add(parent)
            try:
                mode = os.lstat(target).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(mode):
                raise UnsafeMemberError(f"{target} is a directory, but the bundle has a file there")


def _make_staging(root: str) -> str:
    """``tempfile.mkdtemp`` (a fresh, private 0700 folder) without importing tempfile, shutil,
    bz2, lzma and random into every ``bundler unpack``."""
    for _ in range(100):
        path = os.path.join(root, STAGING_PREFIX + os.urandom(8).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused staging folder name", root)


def _remove_tree(path: str) -> None:
    """Remove a staging folder. After a commit that moved whole folders it is already empty, and
    one ``rmdir`` spares ``bundler unpack`` the import of shutil (bz2, lzma: ~2 ms per command)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return
    except OSError:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def _make_folder(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` at the cost of one ``mkdir`` when the parent exists."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)


def _missing_folders(root: str) -> list[str]:
    missing = []
    current = os.path.abspath(root)
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing[::-1]


#: Staging folders older than this were left by a killed process (OOM, SIGKILL) and are removed.
STALE_STAGING_SECONDS = 3600
#: How often a live unpack refreshes its staging folders' mtime (well under the above).
_KEEP_ALIVE_SECONDS = 60


def _sweep_stale_staging(root: str) -> None:
    cutoff = time.time() - STALE_STAGING_SECONDS
    try:
        with os.scandir(root) as entries:
            stale = [e.path for e in entries if e.name.startswith(STAGING_PREFIX) and e.stat().st_mtime < cutoff]
    except OSError:
        return
    for path in stale:
        log.info("removing %s, left behind by an interrupted unpack", path)
        _remove_tree(path)


def _check_parent(root: str, real_root: str, parent: str) -> None:
    """Every existing folder between root and ``parent`` must resolve inside the root."""
    current = root
    for part in os.path.relpath(parent, root).split(os.sep):
        if part == os.curdir:
            return
        current = os.path.join(current, part)
        if not os.path.lexists(current):
            return  # the rest is created by us, fresh
        real = os.path.realpath(current)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise UnsafeMemberError(
                f"{current} is a link to {real}, outside {root}; refusing to write through it. "
                "Remove the link from the cache directory"
            )
        if not os.path.isdir(real):
            raise UnsafeMemberError(f"{current} is a file, but the bundle needs a folder there")
