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

from bundles import honest, snapshot, write_tree

SETTINGS = Settings(zstd_threads=1)
FILES = {f"k{i}/kernel.bin": bytes([i]) * (3000 + 97 * i) + os.urandom(200) for i in range(12)}


@pytest.mark.parametrize("fail_at", [1, 6, 12])  # 12 files: first, middle, last write
def test_disk_full_while_unpacking_keeps_the_cache_as_it_was(tmp_path, monkeypatch, fail_at):
    data, digest = honest(FILES)
    dest = tmp_path / "cache"
    write_tree(dest, {"k0/old.json": b"keep"})
    before = snapshot(tmp_path)
    real_write = os.write
    calls = {"n": 0}

    def filling_disk(fd, payload):
        calls["n"] += 1
        if calls["n"] >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, payload)

    monkeypatch.setattr(archive.os, "write", filling_disk)
    with pytest.raises(LocalCacheError, match="disk is full"):
        archive.unpack(io.BytesIO(data), dest, expected_digest=digest, settings=SETTINGS)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # no staging folder, no partial file, old file intact


def test_disk_full_while_unpacking_is_a_miss_not_a_crash_for_a_session(tmp_path, monkeypatch):
    """The failure policy: a compile session treats a full disk as a cache miss."""
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

    monkeypatch.setattr(archive.os, "write", lambda fd, payload: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with session.CompileSession(code=code, settings=node) as warm:
        assert warm.hit is False  # compiled as if there were no cache, and the job goes on
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
