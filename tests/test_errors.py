"""Errors a user or a script sorts by: the right class, the documented exit code, the object named.

Exit codes (README): 0 ok, 2 usage, 3 not found, 4 integrity or safety, 5 storage, 1 other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundler.config import Settings
from bundler.errors import IntegrityError, LocalFileNotFoundError, StoreError
from bundler.remote import health, layout, refs, transfer
from bundler.stores import open_store


def _bundler(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bundler", *args], capture_output=True, text=True,
                          env={**os.environ}, timeout=120)


def test_a_ref_with_a_tampered_digest_is_an_integrity_error_naming_ref_and_store(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"x" * 100)
    transfer.push(store, tmp_path / "src", ref="team/model", settings=Settings(cache_dir=tmp_path / "c"))
    key = layout.ref_key("team/model")
    doc = json.loads(store.read_bytes(key))
    doc["digest"] = "not-a-digest"
    store.write_bytes(key, json.dumps(doc).encode())

    with pytest.raises(IntegrityError, match=r"v1/refs/team/model\.json in file://"):
        refs.read_ref(store, "team/model", Settings(cache_dir=tmp_path / "c"))
    done = _bundler("pull", "--ref", "team/model", "--into", str(tmp_path / "into"), "--remote", store.url)
    assert done.returncode == 4, done.stderr
    assert "team/model" in done.stderr and store.url in done.stderr and len(done.stderr.splitlines()) == 1


def test_a_missing_local_file_is_not_found_and_no_store_error(tmp_path: Path) -> None:
    assert not issubclass(LocalFileNotFoundError, StoreError)  # a session never blames the store for it
    for args in (["unpack", str(tmp_path / "nope.tar.zst"), "--into", str(tmp_path / "x")],
                 ["pack", str(tmp_path / "no-such-dir"), "-o", str(tmp_path / "out.tar.zst")],
                 ["import", str(tmp_path / "nope.tar.zst"), "--remote", (tmp_path / "s").as_uri()]):
        done = _bundler(*args)
        assert done.returncode == 3, (args, done.stderr)
        assert "nope" in done.stderr or "no-such-dir" in done.stderr


def test_a_missing_local_file_in_a_session_put_leaves_the_store_usable(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    import bundler

    remote = (tmp_path / "store").as_uri()
    settings = Settings(cache_dir=tmp_path / "c", triton_cache_dir=tmp_path / "t", remote=remote, pull_budget=10)
    health.reset()
    try:
        with bundler.compile_session(code="def f(): pass", settings=settings) as session:
            session.sync()
            session.put(settings.triton_cache_dir / "gone" / "k.cubin")  # never existed
        assert health.remote_usable(settings, "read") and health.remote_usable(settings, "write")
    finally:
        health.reset()
