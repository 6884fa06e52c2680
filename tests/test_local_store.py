"""LocalStore beyond the shared contract: full disks, hostile keys, filesystems without hard links.

Faults are injected through the ``FileOps`` seam, so the real code path runs up to the failing call.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from bundler.errors import AccessDeniedError, ConfigError, StoreError
from bundler.stores.local import FileOps, LocalStore


class FullDisk(FileOps):
    """Accepts the first write, then fails like a disk that just filled up."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self.writes += 1
        if self.writes > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(fd, data)


class ReadOnlyPublish(FileOps):
    def replace(self, src: str, dst: str) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    link = replace


class NoHardLinks(FileOps):
    def link(self, src: str, dst: str) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))


def all_files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


@pytest.mark.parametrize("if_absent", [False, True])
def test_full_disk_leaves_no_temp_file_and_keeps_the_old_object(tmp_path: Path, if_absent: bool) -> None:
    LocalStore(tmp_path).write_bytes("v1/refs/a.json", b"old")
    store = LocalStore(tmp_path, ops=FullDisk())
    with pytest.raises(StoreError, match=r"'v1/refs/b.json'.*free space") as err:
        store.write_bytes("v1/refs/b.json", os.urandom(3 << 20), if_absent=if_absent)
    assert not isinstance(err.value, AccessDeniedError)
    assert all_files(tmp_path) == ["v1/refs/a.json"]


def test_permission_error_is_access_denied_and_cleans_up(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, ops=ReadOnlyPublish())
    for if_absent in (False, True):
        with pytest.raises(AccessDeniedError, match=r"'k'.*writable"):
            store.write_bytes("k", b"x", if_absent=if_absent)
    assert all_files(tmp_path) == []


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../escape", "/etc/passwd", "a\\..\\b", "", "a//b", "a/./b", ".hidden", "a/", "nul\0"]
)
def test_keys_that_could_escape_or_alias_are_rejected(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "store")
    for action in (
        lambda: store.write_bytes(key, b"x"),
        lambda: store.open_read(key),
        lambda: store.head(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(ConfigError, match="not a valid store key"):
            action()
    assert not (tmp_path / "escape").exists()
    assert all_files(tmp_path) == []


def test_without_hard_links_create_only_still_has_one_winner(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, ops=NoHardLinks())
    writers = 8
    barrier = threading.Barrier(writers)
    results: list[bool] = []

    def write(i: int) -> None:
        barrier.wait()
        results.append(store.write_bytes("race", str(i).encode() * 1000, if_absent=True))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * (writers - 1) + [True]
    assert store.write_bytes("race", b"later", if_absent=True) is False
    assert all_files(tmp_path) == ["race"]  # no temp or claim files left


def test_listing_skips_temp_files_of_writers_in_progress(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("v1/bundles/a", b"x")
    (tmp_path / "v1" / "bundles" / ".tmp-0123-b").write_bytes(b"partial")
    assert [info.key for info in store.list()] == ["v1/bundles/a"]


def test_missing_key_names_key_and_store(tmp_path: Path) -> None:
    from bundler.errors import NotFoundError

    store = LocalStore(tmp_path)
    with pytest.raises(NotFoundError, match=rf"'v1/refs/x.json' not found in {tmp_path.as_uri()}"):
        store.open_read("v1/refs/x.json")


def test_from_url_accepts_file_urls_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert LocalStore.from_url(tmp_path.as_uri()).root == tmp_path
    assert LocalStore.from_url("file://localhost" + str(tmp_path)).root == tmp_path
    assert LocalStore.from_url(str(tmp_path)).root == tmp_path
    monkeypatch.chdir(tmp_path)
    assert LocalStore.from_url("rel/dir").root == tmp_path / "rel" / "dir"
    with pytest.raises(ConfigError, match="file:///absolute/path"):
        LocalStore.from_url("file://otherhost/x")
