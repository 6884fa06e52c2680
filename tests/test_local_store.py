"""LocalStore beyond the shared contract: full disks, hostile keys, filesystems without hard links.

Faults are injected through the ``FileOps`` seam, so the real code path runs up to the failing call.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from bundler import fileio
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
    def replace(self, src: str, dst: str, **kw: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    link = replace


class NoHardLinks(FileOps):
    def link(self, src: str, dst: str, **kw: object) -> None:
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


def test_without_hard_links_concurrent_create_only_writers_leave_one_whole_object(tmp_path: Path) -> None:
    """Without hard links there is no race-free create-only rename; for the content-addressed keys
    create-only writes serve, every writer writes the same bytes, so all that matters is that the
    object is whole, at least one writer reports creating it, and nothing is left beside it."""
    store = LocalStore(tmp_path, ops=NoHardLinks())
    writers = 8
    payload = os.urandom(300_000)
    barrier = threading.Barrier(writers)
    results: list[bool] = []

    def write() -> None:
        barrier.wait()
        results.append(store.write_bytes("race", payload, if_absent=True))

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == writers and any(results)
    assert (tmp_path / "race").read_bytes() == payload
    assert store.write_bytes("race", b"later", if_absent=True) is False
    assert (tmp_path / "race").read_bytes() == payload
    assert all_files(tmp_path) == ["race"]  # no temp files left


def test_without_hard_links_a_crashed_writers_leftovers_never_block_create_only_writes(tmp_path: Path) -> None:
    """The claim file a crash used to leave made every later create-only write answer "already
    there" for a key that was missing, and push then moved the ref to a bundle that did not exist."""
    from bundler.config import Settings
    from bundler.remote import layout, transfer

    (tmp_path / "v1" / "bundles").mkdir(parents=True)
    files = {"k/a.bin": os.urandom(5000)}
    digest = transfer.push(LocalStore(tmp_path / "probe"), files, settings=Settings(zstd_threads=1)).digest
    name = Path(layout.bundle_key(digest)).name
    for leftover in (f".claim-{name}", f".tmp-0123456789abcdef-{name}"):  # what a kill between steps left
        (tmp_path / "v1" / "bundles" / leftover).write_bytes(b"")
    store = LocalStore(tmp_path, ops=NoHardLinks())
    pushed = transfer.push(store, files, ref="r", settings=Settings(zstd_threads=1))
    assert pushed.uploaded
    assert store.head(layout.bundle_key(pushed.ref.digest)) is not None  # the ref names a bundle that is there
    assert store.write_bytes("v1/bundles/other", b"x", if_absent=True) is True


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _age(path: Path, seconds: float) -> None:
    import time

    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_temp_files_of_killed_writers_are_swept_by_the_next_write_into_that_folder(tmp_path: Path) -> None:

    folder = tmp_path / "v1" / "bundles"
    folder.mkdir(parents=True)
    host = fileio.HOST
    planted = {
        f".tmp-{host}-{_dead_pid()}-0011223344556677-a.tar.zst": (120, False),  # dead writer on this host
        f".tmp-{host}-{_dead_pid()}-8899aabbccddeeff-b.tar.zst": (5, True),  # dead, but only just: grace
        f".tmp-{host}-{os.getppid()}-0123456789abcdef-c.tar.zst": (1800, True),  # live writer on this host
        f".tmp-otherhost-{_dead_pid()}-0123456789abcdef-d.tar.zst": (1800, True),  # other host: the hour rule
        ".tmp-otherhost-1-0123456789abcdef-e.tar.zst": (7200, False),  # other host, over an hour
        ".tmp-0123456789abcdef-f.tar.zst": (7200, False),  # older name form, over an hour
    }
    for name, (age, _) in planted.items():
        (folder / name).write_bytes(b"partial")
        _age(folder / name, age)
    (tmp_path / "v1" / ".tmp-elsewhere").write_bytes(b"not in the folder written to")
    _age(tmp_path / "v1" / ".tmp-elsewhere", 7200)
    LocalStore(tmp_path).write_bytes("v1/bundles/new", b"x")
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted(["new"] + [name for name, (_, kept) in planted.items() if kept])
    assert (tmp_path / "v1" / ".tmp-elsewhere").exists()


def test_a_link_planted_as_a_temp_file_is_removed_without_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    folder = tmp_path / "store" / "v1"
    folder.mkdir(parents=True)
    (folder / ".tmp-x").symlink_to(victim)
    _age(folder / ".tmp-x", 7200)
    LocalStore(tmp_path / "store").write_bytes("v1/k", b"x")
    assert victim.read_bytes() == b"keep"
    assert sorted(p.name for p in folder.iterdir()) == ["k"]


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


# --- things at a key that are no file: FIFOs, sockets, folders, devices, links ---------------------


def _plant(kind: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "socket":  # AF_UNIX paths are short: bind relative to the folder
        import socket

        monkeypatch.chdir(path.parent)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path.name)
        sock.close()
    elif kind == "directory":
        path.mkdir()
    elif kind == "symbolic link":
        target = path.parent.parent / "elsewhere"
        target.write_bytes(b'{"digest": "outside the store"}')
        path.symlink_to(target)
    elif kind == "character device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")


def _in_thread(call, timeout: float = 10.0):  # noqa: ANN001, ANN202 - any call; its result or exception
    """Run ``call`` where a hang cannot hang the test run: the old code blocked forever on a FIFO."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(("ok", call()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(("raised", exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    assert outcome, f"still blocked after {timeout} s"
    return outcome[0]


@pytest.mark.parametrize("kind", ["FIFO", "socket", "directory", "symbolic link", "character device"])
def test_a_non_file_at_a_key_reads_as_missing_at_once(tmp_path: Path, kind: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``head`` already said (None) every read path says too, promptly, naming the path."""
    from bundler.config import Settings
    from bundler.errors import NotFoundError
    from bundler.remote import refs

    store = LocalStore(tmp_path / "store")
    store.write_bytes("v1/refs/other.json", b"{}")
    path = tmp_path / "store" / "v1" / "refs" / "prod.json"
    _plant(kind, path, monkeypatch)
    assert store.head("v1/refs/prod.json") is None
    assert [info.key for info in store.list("v1/refs/")] == ["v1/refs/other.json"]
    for read in (lambda: store.read_bytes("v1/refs/prod.json"),
                 lambda: refs.read_ref(store, "prod", Settings(cache_dir=tmp_path / "cache"))):
        status, result = _in_thread(read)
        assert status == "raised" and isinstance(result, NotFoundError), result
        assert f"{path} is a {kind}" in str(result) and "remove it" in str(result)


def test_a_create_only_write_replaces_a_fifo_that_reads_as_missing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    os.makedirs(tmp_path / "v1" / "bundles")
    os.mkfifo(tmp_path / "v1" / "bundles" / "b")
    assert store.write_bytes("v1/bundles/b", b"bytes", if_absent=True) is True
    assert _in_thread(lambda: store.read_bytes("v1/bundles/b")) == ("ok", b"bytes")
    assert store.write_bytes("v1/bundles/b", b"other", if_absent=True) is False  # now a file: taken

