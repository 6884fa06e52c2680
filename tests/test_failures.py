"""Failure classes a cache meets in production: full disks and corrupted bytes in transit.

Each asserts the user-visible contract: a clear error of our family, and nothing lost or left
half-written, whatever the bytes or the moment the disk fills up.
"""

from __future__ import annotations

import errno
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundler.bundle import archive
from bundler.config import Settings
from bundler.errors import BundleError, LocalCacheError
from bundler.fileio import FileOps

from bundles import honest, snapshot, write_tree

SETTINGS = Settings(zstd_threads=1)
FILES = {f"k{i}/kernel.bin": bytes([i]) * (3000 + 97 * i) + os.urandom(200) for i in range(12)}


class FullDisk(FileOps):
    """The OS seam with a disk that fills up at the ``fail_at``-th write (and stays full)."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.writes = fail_at, 0

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self.writes += 1
        if self.writes >= self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(fd, data)


@pytest.mark.parametrize("fail_at", [1, 6, 12])  # 12 files: first, middle, last write
def test_disk_full_while_unpacking_keeps_the_cache_as_it_was(tmp_path, fail_at):
    data, digest = honest(FILES)
    dest = tmp_path / "cache"
    write_tree(dest, {"k0/old.json": b"keep"})
    before = snapshot(tmp_path)
    disk = FullDisk(fail_at)
    with pytest.raises(LocalCacheError, match="disk is full"):
        archive.unpack(io.BytesIO(data), dest, expected_digest=digest, settings=SETTINGS, ops=disk)
    assert disk.writes == fail_at  # it failed where we said, and stopped there
    assert snapshot(tmp_path) == before  # no staging folder, no partial file, old file intact


def test_disk_full_while_pulling_with_node_state_records_nothing(tmp_path):
    """A pull whose unpack hits a full disk raises, writes no "unpacked" marker, and the next pull
    (disk freed) downloads and places the whole bundle."""
    from bundler.remote import transfer
    from bundler.stores import open_store

    store = open_store((tmp_path / "store").as_uri())
    transfer.push(store, FILES, ref="r", settings=SETTINGS)
    node, dest = tmp_path / "node-state", tmp_path / "cache"
    with pytest.raises(LocalCacheError, match="disk is full"):
        transfer.pull(store, dest, ref="r", settings=SETTINGS, node_state=node, ops=FullDisk(4))
    assert not list(node.glob("*.manifest.json"))
    assert snapshot(dest) == {}
    transfer.pull(store, dest, ref="r", settings=SETTINGS, node_state=node)
    assert {name: (dest / name).read_bytes() for name in FILES} == FILES


def test_disk_full_while_unpacking_is_a_miss_not_a_crash_for_a_session(tmp_path, monkeypatch):
    """The failure policy: a compile session treats a full disk as a cache miss.

    The session opens no seam of its own, so the full disk goes in as the default ``FileOps`` of
    the bundle layer (``archive.REAL_OPS``): only unpacks see it, not the rest of the process.
    """
    from bundler import session
    from bundler.remote import transfer
    from bundler.stores import open_store

    store_url = (tmp_path / "store").as_uri()
    node = Settings(remote=store_url, cache_dir=tmp_path / "node" / "bundler",
                    triton_cache_dir=tmp_path / "node" / "triton", pull_budget=20)
    code = "def model(): pass\n"
    with session.CompileSession(code=code, settings=node) as probe:
        ref = probe.ref_name
    triton_files = {f"triton/{name}": data for name, data in FILES.items()}
    transfer.push(open_store(store_url, node), triton_files, ref=ref, settings=node)

    disk = FullDisk(1)
    monkeypatch.setattr(archive, "REAL_OPS", disk)
    with session.CompileSession(code=code, settings=node) as warm:
        assert warm.hit is False  # compiled as if there were no cache, and the job goes on
    assert disk.writes >= 1  # the disk really was full for the unpack
    assert not any((tmp_path / "node" / "triton").rglob("*.bin"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corruption_is_rejected_or_harmless(tmp_path_factory, data):
    """Flip, drop or insert bytes anywhere: unpack either raises BundleError and writes nothing,
    or (a change zstd cannot see, e.g. in padding) produces exactly the original files."""
    bundle, digest = honest(FILES)
    bundle = bytearray(bundle)
    edit = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    at = data.draw(st.integers(0, len(bundle) - 1))
    if edit == "flip":
        bundle[at] ^= data.draw(st.integers(1, 255))
    elif edit == "truncate":
        del bundle[at:]
    else:
        bundle[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    dest = tmp_path_factory.mktemp("dest")
    use_digest = data.draw(st.booleans())
    try:
        archive.unpack(io.BytesIO(bytes(bundle)), dest, expected_digest=digest if use_digest else None,
                       settings=SETTINGS)
    except BundleError:
        assert snapshot(dest) == {}
    else:
        assert {name: (dest / name).read_bytes() for name in FILES} == FILES


def test_atomic_writes_never_touch_the_process_umask(tmp_path):
    """Reading the umask by setting it races with other threads creating files (world-writable
    cache folders); writes must leave it alone and still honour it."""
    import threading

    from bundler.fileio import write_atomically

    previous = os.umask(0o027)
    try:
        stop = threading.Event()
        seen = []

        def watch():
            while not stop.is_set():
                seen.append(os.umask(0o027))  # returns the current mask (and keeps it)

        watcher = threading.Thread(target=watch)
        watcher.start()
        for i in range(300):
            write_atomically(tmp_path / f"d{i % 7}" / f"f{i}.json", b"{}")
        stop.set()
        watcher.join()
        assert set(seen) == {0o027}
        assert (tmp_path / "d0" / "f0.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e9"])
def test_unusable_time_budgets_are_refused_by_name(value):
    from bundler.errors import ConfigError

    with pytest.raises(ConfigError, match="BUNDLER_PULL_BUDGET"):
        Settings.from_env({"BUNDLER_PULL_BUDGET": value})


def test_oversized_ref_is_refused_without_reading_it_whole(tmp_path):
    from bundler.errors import LimitExceededError
    from bundler.remote import layout, refs
    from bundler.stores import open_store

    store = open_store((tmp_path / "store").as_uri())
    store.write_bytes(layout.ref_key("huge"), b" " * (2 << 20))
    with pytest.raises(LimitExceededError, match="huge"):
        refs.read_ref(store, "huge", SETTINGS)


def test_failed_unpack_into_a_deep_new_folder_leaves_no_folder(tmp_path):
    data, _ = honest(FILES)
    target = tmp_path / "new" / ("x" * 300)  # too long a name: mkdir fails after "new" was made
    with pytest.raises(LocalCacheError):
        archive.unpack(io.BytesIO(data), target, settings=SETTINGS)
    assert list(tmp_path.iterdir()) == []
    archive.unpack(io.BytesIO(data), tmp_path / "new" / ".." / "elsewhere", settings=SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]  # "new" was never needed


def test_empty_file_left_by_a_power_loss_sends_the_next_pull_to_the_store(tmp_path):
    from bundler.remote import transfer
    from bundler.stores import open_store

    store = open_store((tmp_path / "store").as_uri())
    pushed = transfer.push(store, FILES, ref="r", settings=SETTINGS)
    node = tmp_path / "node-state"
    transfer.pull(store, tmp_path / "cache", ref="r", settings=SETTINGS, node_state=node)
    (tmp_path / "cache" / "k3" / "kernel.bin").write_bytes(b"")  # written, never flushed
    again = transfer.pull(store, tmp_path / "cache", ref="r", settings=SETTINGS, node_state=node)
    assert again.digest == pushed.digest
    assert (tmp_path / "cache" / "k3" / "kernel.bin").read_bytes() == FILES["k3/kernel.bin"]


# --- hostile or broken node state: the lock and the "unpacked" marker only save work ----------------


@pytest.fixture
def pushed_store(tmp_path):
    from bundler.remote import transfer
    from bundler.stores import open_store

    store = open_store((tmp_path / "store").as_uri())
    return store, transfer.push(store, FILES, ref="r", settings=SETTINGS).digest


def _pull_in_time(store, dest, node, seconds=20.0):
    """Pull in a thread; fail the test (instead of hanging it) if the pull does not end in time."""
    import threading

    from bundler.remote import transfer

    outcome = {}

    def run():
        try:
            outcome["result"] = transfer.pull(store, dest, ref="r", settings=SETTINGS, node_state=node)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "pull hung on the node state"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _placed(dest):
    return {name: (dest / name).read_bytes() for name in FILES}


@pytest.mark.parametrize("target", ["victim", "missing-dir", "fifo"])
def test_a_link_planted_at_the_node_lock_is_not_followed_and_the_pull_works(tmp_path, pushed_store, target):
    store, digest = pushed_store
    node = tmp_path / "node-state"
    node.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"must stay")
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
    where = {"victim": victim, "missing-dir": tmp_path / "no" / "such" / "dir", "fifo": tmp_path / "fifo"}[target]
    (node / f"{digest}.lock").symlink_to(where)
    _pull_in_time(store, tmp_path / "cache", node)
    assert _placed(tmp_path / "cache") == FILES
    assert victim.read_bytes() == b"must stay"
    assert not (tmp_path / "no").exists()
    assert (node / f"{digest}.lock").is_file() and not (node / f"{digest}.lock").is_symlink()


def test_a_fifo_or_folder_at_the_node_lock_is_replaced(tmp_path, pushed_store):
    store, digest = pushed_store
    node = tmp_path / "node-state"
    node.mkdir()
    os.mkfifo(node / f"{digest}.lock")
    _pull_in_time(store, tmp_path / "cache", node)
    (node / f"{digest}.lock").unlink()
    (node / f"{digest}.lock").mkdir()
    (node / f"{digest}.lock" / "x").write_bytes(b"")
    _pull_in_time(store, tmp_path / "cache2", node)
    assert _placed(tmp_path / "cache") == FILES and _placed(tmp_path / "cache2") == FILES


@pytest.mark.parametrize("target", ["fifo", "victim"])
def test_a_link_planted_at_the_unpacked_marker_is_not_followed(tmp_path, pushed_store, target):
    """A FIFO behind the marker used to block every pull forever; a link to a file must not be
    read as our marker or written through."""
    store, digest = pushed_store
    node = tmp_path / "node-state"
    node.mkdir()
    where = tmp_path / target
    if target == "fifo":
        os.mkfifo(where)
    else:
        where.write_bytes(b"must stay")
    (node / f"{digest}.manifest.json").symlink_to(where)
    _pull_in_time(store, tmp_path / "cache", node)
    assert _placed(tmp_path / "cache") == FILES
    marker = node / f"{digest}.manifest.json"
    assert marker.is_file() and not marker.is_symlink()
    if target == "victim":
        assert where.read_bytes() == b"must stay"


def test_an_unusable_node_state_folder_means_pulling_without_the_lock(tmp_path, pushed_store):
    store, _ = pushed_store
    node = tmp_path / "node-state"
    node.write_bytes(b"a file where the folder should be")
    _pull_in_time(store, tmp_path / "cache", node)
    assert _placed(tmp_path / "cache") == FILES
    if os.geteuid() != 0:  # root ignores folder permissions
        ro = tmp_path / "read-only-state"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            _pull_in_time(store, tmp_path / "cache2", ro)
        finally:
            ro.chmod(0o700)
        assert _placed(tmp_path / "cache2") == FILES
