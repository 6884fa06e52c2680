"""Soak and fault suite: many processes pushing and pulling while some are killed, then the books.

What a user relies on, checked after every run:
- nothing is written outside each process's destination (a canary tree next to them is unchanged);
- no partial file is visible in a destination: every file there is, byte for byte, a file of some
  bundle in the store;
- staging a killed unpack left is swept by the next unpack into that folder;
- no ref in the store names a missing bundle, and every bundle object verifies against its digest;
- temp files of killed writers (``file://`` stores) are swept by the next write into their folder,
  and incomplete multipart uploads (S3) are aborted by ``S3Store.abort_stale_uploads``.

Disk full during unpack is covered at the archive level in ``test_failures.py`` and during the
commit, call by call, in ``test_placement.py``
(``test_commit_failing_at_the_kth_move_leaves_the_destination_as_it_was``); here both go through
a whole pull (``transfer.pull(ops=...)``), with the node lock and marker involved.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from bundler.bundle import archive, placement
from bundler.config import Settings
from bundler.errors import LocalCacheError
from bundler.fileio import FileOps
from bundler.remote import layout, transfer
from bundler.remote.refs import read_ref
from bundler.stores import open_store

from bundles import snapshot, write_tree

WORKERS = 16
REFS = 4
RUN_SECONDS = 9.0
SOAK_SETTINGS = dict(zstd_threads=1, multipart_threshold=128 << 10, multipart_chunksize=64 << 10,
                     max_concurrency=2, connect_timeout=2.0, read_timeout=10.0, max_attempts=3)
PRODUCER = {"bundler": "soak"}


# --- the worker: runs in a forked child ------------------------------------------------------------


def _worker(store_url: str, dest: str, node_state: str, seed: int, ops: int) -> None:
    """Push and pull random bundles under overlapping refs; exit 0, or 1 on anything unexpected."""
    from bundler.errors import NotFoundError

    code = 0
    try:
        rng = random.Random(seed)
        settings = Settings(**SOAK_SETTINGS)
        store = open_store(store_url, settings)
        for _ in range(ops):
            ref = f"soak/r{rng.randrange(REFS)}"
            if rng.random() < 0.5:
                files = {
                    f"d{rng.randrange(3)}/f{rng.randrange(8)}.bin": os.urandom(rng.randrange(1, 60_000))
                    for _ in range(rng.randrange(1, 7))
                }
                transfer.push(store, files, ref=ref, settings=settings, producer=PRODUCER)
            else:
                with contextlib.suppress(NotFoundError):  # nobody pushed this ref yet
                    transfer.pull(store, Path(dest), ref=ref, settings=settings, node_state=Path(node_state))
    except BaseException:  # noqa: BLE001 - reported through the exit code
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _soak(store_url: str, base: Path) -> dict[str, int]:
    """Run WORKERS processes for RUN_SECONDS while a killer SIGKILLs some; respawn into the same slot."""
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1234)
    node_state = base / "node-state"
    slots: list[multiprocessing.Process | None] = [None] * WORKERS
    outcome = {"finished": 0, "killed": 0, "failed": 0, "spawned": 0}

    def reap(proc: multiprocessing.Process) -> None:
        proc.join()
        if proc.exitcode == 0:
            outcome["finished"] += 1
        elif proc.exitcode == -signal.SIGKILL:
            outcome["killed"] += 1
        else:
            outcome["failed"] += 1

    stop_at = time.monotonic() + RUN_SECONDS
    while time.monotonic() < stop_at:
        for i, proc in enumerate(slots):
            if proc is not None and proc.is_alive():
                continue
            if proc is not None:
                reap(proc)
            outcome["spawned"] += 1
            slots[i] = ctx.Process(target=_worker, daemon=True,
                                   args=(store_url, str(base / "dest" / str(i)), str(node_state),
                                         rng.randrange(1 << 30), rng.randrange(3, 8)))
            slots[i].start()
            if rng.random() < 0.2:  # kill mid-work soon after a start: forking a big test process can
                time.sleep(rng.uniform(0, 0.03))  # take longer than a worker lives, so the periodic
                with contextlib.suppress(ProcessLookupError):  # killer alone may find none alive
                    os.kill(slots[i].pid, signal.SIGKILL)  # a process this test started
        time.sleep(rng.uniform(0.05, 0.25))
        alive = [p for p in slots if p is not None and p.is_alive()]
        for victim in rng.sample(alive, min(len(alive), rng.choice([0, 1, 2, 2]))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGKILL)  # a process this test started
    for proc in slots:  # let the last ones finish; a hung one is a failure
        if proc is None:
            continue
        proc.join(30)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            outcome["failed"] += 1
        else:
            reap(proc)
    return outcome


# --- the books ---------------------------------------------------------------------------------


def _bundle_files(store, settings: Settings) -> set[tuple[str, str]]:
    """(path, sha256) of every file of every bundle in the store; each bundle verified on the way."""
    files: set[tuple[str, str]] = set()
    for info in store.list(layout.BUNDLES):
        digest = layout.digest_from_bundle_key(info.key)
        assert digest is not None, f"unexpected object {info.key}"
        with store.open_read(info.key) as stream:
            man = archive.verify(stream, expected_digest=digest, settings=settings)
        files |= {(record.path, record.sha256) for record in man.files}
    return files


def _check_books(store, base: Path, settings: Settings, canary_before: dict) -> None:
    assert snapshot(base / "canary") == canary_before, "something was written outside the destinations"
    assert sorted(p.name for p in base.iterdir()) == sorted(["canary", "dest", "node-state", "store"]) or \
        sorted(p.name for p in base.iterdir()) == sorted(["canary", "dest", "node-state"])

    for info in store.list(layout.REFS):  # no ref names a missing bundle
        name = layout.ref_name_from_key(info.key)
        ref = read_ref(store, name, settings)
        assert store.head(layout.bundle_key(ref.digest)) is not None, f"ref {name} names a missing bundle"
    known = _bundle_files(store, settings)
    assert known, "the soak pushed nothing"

    # One more pull into every destination (nothing killed now): it sweeps what killed unpacks left.
    for dest in sorted((base / "dest").iterdir()):
        transfer.pull(store, dest, ref="soak/r0", settings=settings, node_state=base / "node-state")
        assert [p.name for p in dest.iterdir() if p.name.startswith(placement.STAGING_PREFIX)] == []
        for path in dest.rglob("*"):
            rel = path.relative_to(dest).as_posix()
            assert not path.is_symlink(), rel
            if path.is_file():
                assert (rel, hashlib.sha256(path.read_bytes()).hexdigest()) in known, f"partial or foreign {rel}"


@pytest.fixture
def area(tmp_path: Path) -> tuple[Path, dict]:
    write_tree(tmp_path / "canary", {"d0/f0.bin": b"canary", "d1/f1.bin": b"canary", "v1/refs/x.json": b"{}"})
    (tmp_path / "dest").mkdir()
    return tmp_path, snapshot(tmp_path / "canary")


@pytest.mark.slow
def test_soak_on_a_local_store(area) -> None:
    base, canary = area
    url = (base / "store").as_uri()
    outcome = _soak(url, base)
    assert outcome["failed"] == 0 and outcome["killed"] > 0 and outcome["finished"] > 0, outcome
    settings = Settings(**SOAK_SETTINGS)
    store = open_store(url, settings)
    _check_books(store, base, settings, canary)

    # Temp files of killed writers: once past the hour no writer lives that long, the next write
    # into each folder removes them all. (The dead-pid rule has its own test in
    # test_local_store.py; here a busy machine may already have reused a killed writer's pid.)
    temps = [p for p in (base / "store").rglob(".tmp-*")]
    past = time.time() - 7200
    for path in temps:
        os.utime(path, (past, past))
    for folder in {p.parent for p in (base / "store").rglob("*") if p.is_file()}:
        key = f"{folder.relative_to(base / 'store').as_posix()}/final-write"
        open_store(url, settings).write_bytes(key, b"x")
        store.delete(key)
    assert list((base / "store").rglob(".tmp-*")) == []


@pytest.mark.slow
def test_soak_on_s3_over_http(area, s3_server: str, boto_client, moto_endpoint: str) -> None:  # noqa: ANN001
    base, canary = area
    outcome = _soak(s3_server, base)
    assert outcome["failed"] == 0 and outcome["killed"] > 0 and outcome["finished"] > 0, outcome
    settings = Settings(**SOAK_SETTINGS)
    store = open_store(s3_server, settings)
    _check_books(store, base, settings, canary)

    store.abort_stale_uploads(0)  # killed multipart pushes: nothing else is uploading now
    client = boto_client(moto_endpoint)
    assert client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


# --- S3 leftovers of killed uploads ------------------------------------------------------------------


@pytest.fixture(params=["s3_inprocess", "s3_server"])
def s3_url_and_client(request: pytest.FixtureRequest, boto_client):  # noqa: ANN001, ANN201
    url = request.getfixturevalue(request.param)
    endpoint = request.getfixturevalue("moto_endpoint") if request.param == "s3_server" else None
    return url, boto_client(endpoint)


def test_stale_multipart_uploads_under_the_prefix_are_aborted(s3_url_and_client, small_settings) -> None:  # noqa: ANN001
    url, client = s3_url_and_client
    store = open_store(url, small_settings)
    bucket = store.bucket

    def start(key: str) -> str:  # what a push killed between parts leaves
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * 1000)
        return upload_id

    start(f"{store.prefix}/v1/bundles/{'a' * 64}.tar.zst")
    start(f"{store.prefix}ed/v1/bundles/other-prefix")  # shares the prefix's characters, not its folder
    start("elsewhere/key")

    def left() -> list[str]:
        return sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    # moto reports every upload as initiated on 2010-11-10, so "young" here means under a century.
    assert store.abort_stale_uploads(dt.timedelta(days=36500)) == []
    assert len(left()) == 3
    assert store.abort_stale_uploads(0) == [f"v1/bundles/{'a' * 64}.tar.zst"]
    assert left() == sorted([f"{store.prefix}ed/v1/bundles/other-prefix", "elsewhere/key"])
    assert store.abort_stale_uploads(0) == []
    with pytest.raises(Exception, match="negative"):
        store.abort_stale_uploads(-1)


# --- disk full through a whole pull ------------------------------------------------------------------


class FailAt(FileOps):
    """The k-th call of ``method`` fails with ENOSPC (a disk or quota that just filled up)."""

    def __init__(self, method: str, k: int) -> None:
        self.method, self.k, self.calls = method, k, 0

    def __getattribute__(self, name: str):  # noqa: ANN204
        if name in ("write", "rename", "replace", "mkdir", "link") and name == object.__getattribute__(self, "method"):
            real = object.__getattribute__(self, name)

            def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                self.calls += 1
                if self.calls >= self.k:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(*args, **kwargs)

            return failing
        return object.__getattribute__(self, name)


OLD = {"d0/f0.bin": b"old", "d0/keep.bin": b"mine", "d2/f1.bin": b"old two"}
NEW = {"d0/f0.bin": b"new" * 900, "d0/f1.bin": b"n1" * 700, "d1/f2.bin": b"n2" * 500, "d2/f1.bin": b"n3" * 300}


@pytest.mark.parametrize(("method", "k"), [("write", 1), ("write", 3), ("rename", 1), ("replace", 1),
                                           ("replace", 2), ("mkdir", 1)])
def test_disk_full_during_a_pulls_unpack_or_commit_leaves_the_cache_as_it_was(
    s3_server: str, small_settings: Settings, tmp_path: Path, method: str, k: int
) -> None:
    """The pull raises, the cache keeps its old files, no staging or marker is left, and the next
    pull (space freed) places the whole bundle."""
    store = open_store(s3_server, small_settings)
    transfer.push(store, NEW, ref="r", settings=small_settings, producer=PRODUCER)
    dest, node = tmp_path / "cache", tmp_path / "node-state"
    write_tree(dest, OLD)
    (tmp_path / "canary").mkdir()
    before = snapshot(tmp_path)
    ops = FailAt(method, k)
    with pytest.raises(LocalCacheError):
        transfer.pull(store, dest, ref="r", settings=small_settings, node_state=node, ops=ops)
    assert ops.calls >= k  # the fault was reached
    assert {p: d for p, d in snapshot(tmp_path).items() if not p.startswith("node-state")} == before
    assert not list(node.glob("*.manifest.json"))
    transfer.pull(store, dest, ref="r", settings=small_settings, node_state=node)
    assert {n: (dest / n).read_bytes() for n in NEW} == NEW and (dest / "d0/keep.bin").read_bytes() == b"mine"
