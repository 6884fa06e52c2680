"""The Store contract, run unchanged against every backend (see ``store_url`` in conftest.py).

Objects come in three sizes so every transfer path runs: tiny (one request), medium (one GET /
PUT but larger than the read buffer) and large (above ``small_settings.multipart_threshold``:
multipart upload, parallel ranged GETs).
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import pytest

from bundler.config import Settings
from bundler.errors import NotFoundError
from bundler.progress import Progress
from bundler.stores import Store
from bundler.stores.streams import READ_BUFFER

SIZES = {"empty": 0, "tiny": 5, "medium": 320 << 10, "large": (700 << 10) + 13}


class RecordingProgress(Progress):
    """Remembers what a transfer reported; thread-safe like the contract demands."""

    def __init__(self) -> None:
        self.starts: list[int | None] = []
        self.moved = 0
        self.closed = 0
        self._lock = threading.Lock()

    def start(self, total: int | None = None, **kwargs: Any) -> None:
        self.starts.append(total)

    def update(self, n: int, **kwargs: Any) -> None:
        with self._lock:
            self.moved += n

    def close(self, **kwargs: Any) -> None:
        self.closed += 1


class ExplodingStream(io.RawIOBase):
    """Yields ``good`` bytes, then fails like a producer that crashed mid-write."""

    def __init__(self, good: bytes) -> None:
        self._good = io.BytesIO(good)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._good.readinto(buffer)
        if not n:
            raise RuntimeError("producer died")
        return n


def payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size)) if size < 64 else os.urandom(size)


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("known_size", [True, False], ids=["sized", "unsized"])
def test_round_trip(store: Store, size: int, known_size: bool) -> None:
    data = payload(size)
    assert store.write("v1/bundles/x.tar.zst", io.BytesIO(data), size=size if known_size else None) is True
    assert store.read_bytes("v1/bundles/x.tar.zst") == data
    assert store.head("v1/bundles/x.tar.zst").size == size


@pytest.mark.parametrize("size", [SIZES["medium"], SIZES["large"]], ids=["single", "ranged"])
def test_read_streams_in_order_without_buffering_the_object(store: Store, size: int) -> None:
    data = payload(size)
    store.write_bytes("obj", data)
    progress = RecordingProgress()
    with store.open_read("obj", progress=progress) as stream:
        first = stream.read(1)
        # Only what the caller asked for plus one read buffer may have been handed over so far.
        assert progress.moved <= READ_BUFFER < size
        pieces = [first]
        while piece := stream.read(7919):  # a prime, so reads straddle every chunk boundary
            pieces.append(piece)
    assert b"".join(pieces) == data
    assert progress.starts == [size] and progress.moved == size and progress.closed == 1


def test_overwrite_replaces(store: Store) -> None:
    store.write_bytes("k", b"old")
    assert store.write_bytes("k", b"new") is True
    assert store.read_bytes("k") == b"new"


@pytest.mark.parametrize("size", [SIZES["tiny"], SIZES["large"]], ids=["put", "multipart"])
def test_failed_producer_leaves_nothing(store: Store, size: int) -> None:
    with pytest.raises(RuntimeError, match="producer died"):
        store.write("k", io.BufferedReader(ExplodingStream(payload(size))))
    assert store.head("k") is None
    assert list(store.list()) == []


def test_write_reports_progress(store: Store, small_settings: Settings) -> None:
    data = payload(SIZES["large"])
    progress = RecordingProgress()
    store.write("k", io.BytesIO(data), size=len(data), progress=progress)
    assert progress.starts == [len(data)] and progress.moved == len(data) and progress.closed == 1


# --- create-only writes --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [SIZES["tiny"], SIZES["large"]], ids=["put", "multipart"])
def test_if_absent_creates_once_and_never_clobbers(store: Store, size: int) -> None:
    first, second = payload(size, seed=1), payload(size, seed=2)
    assert store.write("k", io.BytesIO(first), if_absent=True) is True
    assert store.write("k", io.BytesIO(second), if_absent=True) is False
    assert store.read_bytes("k") == first


def test_concurrent_if_absent_writers_have_exactly_one_winner(store: Store) -> None:
    writers = 8
    bodies = [payload(4096 + i, seed=i) for i in range(writers)]
    barrier = threading.Barrier(writers)
    results: list[bool | BaseException] = [False] * writers

    def write(i: int) -> None:
        barrier.wait()
        try:
            results[i] = store.write_bytes("race", bodies[i], if_absent=True)
        except BaseException as exc:  # reported below, with the others
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1, results
    assert results.count(False) == writers - 1, results
    assert store.read_bytes("race") == bodies[results.index(True)]


# --- head / exists / list / delete ---------------------------------------------------------------


def test_head_and_exists(store: Store) -> None:
    assert store.head("nope") is None
    assert store.exists("nope") is False
    store.write_bytes("v1/refs/a.json", b"{}")
    info = store.head("v1/refs/a.json")
    assert info is not None and info.key == "v1/refs/a.json" and info.size == 2
    assert info.modified is not None
    assert store.exists("v1/refs/a.json")
    assert store.head("v1/refs") is None  # a folder-like prefix is not an object


def test_list_is_in_key_order_and_filters_by_prefix(store: Store) -> None:
    assert list(store.list()) == []
    keys = ["b/2", "a/10", "ab", "a/2", "a/1", "a/sub/x"]
    for key in keys:
        store.write_bytes(key, key.encode())
    assert [info.key for info in store.list()] == sorted(keys)
    assert [info.key for info in store.list("a/")] == ["a/1", "a/10", "a/2", "a/sub/x"]
    assert [info.key for info in store.list("a")] == ["a/1", "a/10", "a/2", "a/sub/x", "ab"]
    assert [info.key for info in store.list("a/1")] == ["a/1", "a/10"]
    assert [info.key for info in store.list("zzz")] == []
    assert {info.key: info.size for info in store.list("b/")} == {"b/2": 3}


def test_delete_is_idempotent(store: Store) -> None:
    store.write_bytes("k", b"x")
    store.delete("k")
    assert store.head("k") is None
    store.delete("k")
    store.delete("never-existed")


def test_missing_key_raises_not_found_naming_it(store: Store) -> None:
    with pytest.raises(NotFoundError, match="missing.json"):
        store.open_read("v1/refs/missing.json")
    with pytest.raises(NotFoundError):
        store.read_bytes("v1/refs/missing.json")
