"""The failure policy (``bundler.remote.health.guarded``) as a job sees it, against real stores.

What a user relies on: the cache never holds a job back, and one bad object or one denied action
does not switch off what still works. Each test drives the real store code (moto over HTTP, with
``tests/fault_proxy.py`` answering errors on cue, or a local folder) and asserts what happens to
the *other* kinds of request afterwards, and how many warning lines the job printed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.config import Settings
from bundler.remote import health, layout, transfer
from bundler.remote.health import guarded, remote_usable, shared_store

from fault_proxy import Fault, FaultProxy, refused_endpoint

FILES = {f"k{i}/kernel.bin": os.urandom(2000 + i) for i in range(4)}
RECORD_KEY = layout.autotune_key("matmul/abc")


@pytest.fixture(autouse=True)
def fresh_health() -> Iterator[None]:
    health.reset()
    yield
    health.reset()


def _settings(remote: str, **kw) -> Settings:
    base = dict(remote=remote, pull_budget=20, zstd_threads=1, connect_timeout=1.0, read_timeout=3.0,
                max_attempts=1)
    base.update(kw)
    return Settings(**base)


def _seed(settings: Settings) -> None:
    """A bundle under ref "r" and one per-kernel record, written behind the policy's back."""
    store = shared_store(settings)
    transfer.push(store, FILES, ref="r", settings=settings)
    store.write_bytes(RECORD_KEY, b'{"config": {}}')


def _reads_still_work(settings: Settings, tmp_path: Path) -> None:
    store = shared_store(settings)
    pulled = guarded(settings, "read", layout.ref_key("r"),
                     lambda: transfer.pull(store, tmp_path / "cache", ref="r", settings=settings))
    assert pulled is not None, "bundle reads were switched off"
    assert {n: (tmp_path / "cache" / n).read_bytes() for n in FILES} == FILES
    assert guarded(settings, "read", RECORD_KEY, lambda: store.read_bytes(RECORD_KEY)) == b'{"config": {}}'


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("bundler")]


@pytest.fixture(params=["local", "s3_server"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return (tmp_path / "store").as_uri()
    return request.getfixturevalue("s3_server")


def test_an_oversized_triton_object_is_a_miss_for_that_file_only(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One object over the small-object limit (1 MiB) written into v1/triton/ by anyone with
    write access must not switch off bundles and records for the job (it used to, for 5 minutes)."""
    pytest.importorskip("triton")
    from bundler.integrations.triton_remote import StoreRemoteCacheBackend, triton_object_key

    monkeypatch.setenv("BUNDLER_REMOTE", remote)
    monkeypatch.setenv("BUNDLER_PULL_BUDGET", "20")
    settings = _settings(remote)
    _seed(settings)
    store = shared_store(settings)
    store.write_bytes(triton_object_key("abc", "big.so"), b"\0" * ((1 << 20) + 1))
    store.write_bytes(triton_object_key("abc", "small.json"), b"{}")

    with caplog.at_level(logging.INFO):
        found = StoreRemoteCacheBackend("abc").get(["big.so", "small.json"])
        again = StoreRemoteCacheBackend("abc").get(["small.json"])
    assert found == {"small.json": b"{}"} and again == {"small.json": b"{}"}
    assert remote_usable(settings, "read") and remote_usable(settings, "write")
    _reads_still_work(settings, tmp_path)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "big.so" in warned[0] and "miss" in warned[0], warned


def test_access_denied_on_write_leaves_reads_on(
    moto_endpoint: str, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Training nodes often hold read-only credentials: a denied save stops saves, not loads."""
    proxy = FaultProxy(moto_endpoint)
    try:
        remote = f"s3://{s3_bucket}/p?endpoint={proxy.url}&addressing=path"
        settings = _settings(remote)
        _seed(settings)
        proxy.add(Fault(when=lambda seen: seen.method in ("PUT", "POST"), times=None, status=403, code="AccessDenied"))
        store = shared_store(settings)
        with caplog.at_level(logging.INFO):
            saved = guarded(settings, "write", RECORD_KEY + ".new",
                            lambda: store.write_bytes(RECORD_KEY + ".new", b"{}"))
            puts = len(proxy.requests("PUT"))
            again = guarded(settings, "write", "v1/autotune/other",
                            lambda: store.write_bytes("v1/autotune/other", b"{}"))
            assert len(proxy.requests("PUT")) == puts  # the second save was not even tried
            _reads_still_work(settings, tmp_path)
        assert saved is None and again is None
        assert remote_usable(settings, "read") and not remote_usable(settings, "write")
        warned = _warnings(caplog)
        assert len(warned) == 1 and "writes skipped" in warned[0] and "reads" not in warned[0], warned
    finally:
        proxy.close()


def test_an_unreachable_store_stops_reads_and_writes_with_one_warning(
    aws_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(f"s3://bucket/p?endpoint={refused_endpoint()}&addressing=path")
    tried: list[str] = []

    def request(what: str):
        def run() -> bytes:
            tried.append(what)
            return shared_store(settings).read_bytes(RECORD_KEY)
        return run

    with caplog.at_level(logging.INFO):
        assert guarded(settings, "read", RECORD_KEY, request("first read")) is None
        assert guarded(settings, "read", layout.ref_key("r"), request("second read")) is None
        assert guarded(settings, "write", RECORD_KEY, request("write")) is None
    assert tried == ["first read"]  # after the failure nothing else went to the store
    assert not remote_usable(settings, "read") and not remote_usable(settings, "write")
    warned = _warnings(caplog)
    assert len(warned) == 1 and "reads and writes skipped" in warned[0], warned


def test_a_corrupt_bundle_never_trips_anything(
    remote: str, tmp_path: Path, boto_client, caplog: pytest.LogCaptureFixture  # noqa: ANN001
) -> None:
    settings = _settings(remote)
    store = shared_store(settings)
    pushed = transfer.push(store, FILES, ref="r", settings=settings)
    key = layout.bundle_key(pushed.digest)
    data = bytearray(store.read_bytes(key, limit=1 << 30))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(key, bytes(data))
    store.write_bytes(RECORD_KEY, b'{"config": {}}')

    with caplog.at_level(logging.INFO):
        for attempt in range(3):
            got = guarded(settings, "read", key,
                          lambda attempt=attempt: transfer.pull(store, tmp_path / f"c{attempt}", ref="r",
                                                              settings=settings))
            assert got is None
    assert remote_usable(settings, "read") and remote_usable(settings, "write")
    assert guarded(settings, "read", RECORD_KEY, lambda: store.read_bytes(RECORD_KEY)) == b'{"config": {}}'
    warned = _warnings(caplog)
    assert warned and all(key[-22:] in w and "skipped" not in w for w in warned), warned
    assert not any((tmp_path / f"c{i}").exists() and any((tmp_path / f"c{i}").iterdir()) for i in range(3))
    # and the next push repairs it: the object is replaced and reads hit again
    assert transfer.push(store, FILES, ref="r", settings=settings).uploaded
    _reads_still_work(settings, tmp_path)
