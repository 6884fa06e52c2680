"""push / pull / export / import over every store backend: the round trips users rely on."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from bundler.config import Settings
from bundler.errors import (
    BundleError,
    ConfigError,
    IntegrityError,
    NotFoundError,
    SignatureError,
    StoreError,
)
from bundler.remote import layout, refs, transfer
from bundler.stores import open_store

from bundles import honest, snapshot, write_tree
from fault_proxy import Fault, FaultProxy

FILES = {f"k{i}/kernel.cubin": os.urandom(30_000 + i) for i in range(12)} | {"k0/kernel.json": b'{"num_warps": 4}'}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    write_tree(tmp_path / "src", FILES)
    return tmp_path / "src"


def test_push_then_pull_round_trip(store, src, tmp_path, small_settings):
    pushed = transfer.push(store, src, ref="team/model-a", settings=small_settings)
    assert pushed.uploaded and store.exists(layout.bundle_key(pushed.digest))
    by_ref = transfer.pull(store, tmp_path / "a", ref="team/model-a", settings=small_settings)
    by_digest = transfer.pull(store, tmp_path / "b", digest=pushed.digest, settings=small_settings)
    assert by_ref.digest == by_digest.digest == pushed.digest
    assert by_ref.ref is not None and by_ref.ref.size == pushed.size
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b") == snapshot(src)


def test_second_push_skips_the_upload_and_moves_the_ref(store, src, small_settings):
    first = transfer.push(store, src, ref="r1", settings=small_settings)
    again = transfer.push(store, src, ref="r2", settings=small_settings)
    assert first.digest == again.digest and first.uploaded and not again.uploaded
    assert refs.read_ref(store, "r2", small_settings).digest == first.digest
    listing = transfer.list_remote(store)
    assert [name for name, _ in listing.refs] == ["r1", "r2"]
    assert [(d, info.size) for d, info in listing.bundles] == [(first.digest, first.size)]


def test_a_bundle_gc_deletes_while_a_push_checks_it_is_uploaded_again(store, src, small_settings, monkeypatch):
    """gc deletes the stored bundle between the push's head and its read of the manifest."""
    first = transfer.push(store, src, settings=small_settings)
    key = layout.bundle_key(first.digest)
    real_open_read = type(store).open_read

    def open_read_after_gc(self, name, **kwargs):  # noqa: ANN001, ANN202
        if name == key:
            self.delete(key)
        return real_open_read(self, name, **kwargs)

    monkeypatch.setattr(type(store), "open_read", open_read_after_gc)
    again = transfer.push(store, src, ref="after-gc", settings=small_settings)
    monkeypatch.undo()
    assert again.digest == first.digest and again.uploaded
    assert store.exists(key)
    assert refs.read_ref(store, "after-gc", small_settings).digest == first.digest


def test_pull_misses_raise_not_found(store, tmp_path, small_settings):
    with pytest.raises(NotFoundError):
        transfer.pull(store, tmp_path / "d", ref="never-pushed", settings=small_settings)
    with pytest.raises(NotFoundError):
        transfer.pull(store, tmp_path / "d", digest="ab" * 32, settings=small_settings)
    assert not (tmp_path / "d").exists()


def test_corrupt_object_in_the_store_is_rejected_and_nothing_unpacked(store, src, tmp_path, small_settings):
    pushed = transfer.push(store, src, settings=small_settings)
    other, _ = honest({"k0/kernel.json": b"{}"})
    store.write_bytes(layout.bundle_key(pushed.digest), other)  # replaced behind our back
    (tmp_path / "dest").mkdir()
    with pytest.raises(IntegrityError, match=pushed.digest):
        transfer.pull(store, tmp_path / "dest", digest=pushed.digest, settings=small_settings)
    assert snapshot(tmp_path / "dest") == {}


def test_export_then_import_into_another_store(store, src, tmp_path, small_settings):
    pushed = transfer.push(store, src, ref="prod", settings=small_settings)
    out = io.BytesIO()
    man = transfer.export(store, out, ref="prod", settings=small_settings)
    assert man.digest == pushed.digest and len(out.getvalue()) == pushed.size
    offline = tmp_path / "offline.tar.zst"
    offline.write_bytes(out.getvalue())
    mirror = open_store((tmp_path / "mirror").as_uri(), small_settings)
    imported = transfer.import_file(mirror, str(offline), ref="prod", settings=small_settings)
    assert imported.digest == pushed.digest and imported.uploaded
    assert mirror.read_bytes(layout.bundle_key(pushed.digest)) == out.getvalue()
    transfer.pull(mirror, tmp_path / "air-gapped", ref="prod", settings=small_settings)
    assert snapshot(tmp_path / "air-gapped") == snapshot(src)


def test_export_of_a_ref_that_needs_another_bundle_says_which(store, src, tmp_path, small_settings, caplog):
    """A torch ref keeps its precompiled headers in a second bundle: the offline file holds only
    the ref's own, so the export names the other one and how to export it."""
    headers = transfer.push(store, {"pch/h.gch": b"header"}, settings=small_settings)
    transfer.push(store, src, ref="torch/x", settings=small_settings,
                  ref_extra={"bundles": {"pch": {"digest": headers.digest, "size": headers.size, "files": 1}}})
    transfer.export(store, io.BytesIO(), ref="torch/x", settings=small_settings)
    assert f"bundler export --digest {headers.digest}" in caplog.text


def test_import_of_a_corrupt_file_uploads_nothing(store, tmp_path, small_settings):
    data, _ = honest({"a": b"x" * 1000})
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(data[:-30])
    with pytest.raises(BundleError):
        transfer.import_file(store, str(bad), ref="bad", settings=small_settings)
    assert list(store.list("")) == []


def test_signed_refs_are_enforced_when_a_key_is_set(store, src, small_settings, tmp_path):
    small_settings = small_settings.replace(cache_dir=tmp_path / "cache")  # readers remember versions there
    signer = small_settings.replace(signing_key="s3cret")
    transfer.push(store, src, ref="signed", settings=signer)
    transfer.push(store, src, ref="unsigned", settings=small_settings)
    assert refs.read_ref(store, "signed", signer).signature.startswith("hmac-sha256:")
    assert refs.read_ref(store, "unsigned", small_settings).signature is None
    with pytest.raises(SignatureError, match="unsigned"):
        refs.read_ref(store, "unsigned", signer)
    with pytest.raises(SignatureError, match="wrong signature"):
        refs.read_ref(store, "signed", small_settings.replace(signing_key="other"))
    doc = json.loads(store.read_bytes(layout.ref_key("signed")))
    doc["digest"] = "0" * 64  # point the ref at another bundle, keep the old signature
    store.write_bytes(layout.ref_key("signed"), json.dumps(doc).encode())
    with pytest.raises(SignatureError, match="wrong signature"):
        refs.read_ref(store, "signed", signer)


def test_ref_copied_under_another_name_is_rejected(store, src, small_settings):
    transfer.push(store, src, ref="a", settings=small_settings)
    store.write_bytes(layout.ref_key("b"), store.read_bytes(layout.ref_key("a")))
    with pytest.raises(SignatureError, match="copied"):
        refs.read_ref(store, "b", small_settings)


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/../../b", "", "white space"])
def test_bad_ref_names_are_refused_before_any_request(store, src, name, small_settings):
    with pytest.raises(ConfigError):
        transfer.push(store, src, ref=name, settings=small_settings)
    assert list(store.list("")) == []


def test_download_that_keeps_breaking_leaves_nothing_in_dest(moto_endpoint, s3_bucket, src, tmp_path, small_settings):
    url = f"s3://{s3_bucket}/p?endpoint={moto_endpoint}&addressing=path"
    pushed = transfer.push(open_store(url, small_settings), src, settings=small_settings)
    proxy = FaultProxy(moto_endpoint)
    try:
        proxy.add(Fault(when=lambda seen: seen.method == "GET" and "bundles" in seen.path, times=None,
                        cut_after=5000, reset=True))
        store = open_store(f"s3://{s3_bucket}/p?endpoint={proxy.url}&addressing=path", small_settings)
        (tmp_path / "dest").mkdir()
        with pytest.raises((StoreError, BundleError)):
            transfer.pull(store, tmp_path / "dest", digest=pushed.digest, settings=small_settings)
        assert snapshot(tmp_path / "dest") == {}
    finally:
        proxy.close()


def test_download_broken_once_is_resumed_and_verified(moto_endpoint, s3_bucket, src, tmp_path):
    settings = Settings(max_attempts=3, connect_timeout=2, read_timeout=5)  # one stream, no ranges
    url = f"s3://{s3_bucket}/p?endpoint={moto_endpoint}&addressing=path"
    pushed = transfer.push(open_store(url, settings), src, settings=settings)
    proxy = FaultProxy(moto_endpoint)
    try:
        proxy.add(Fault(when=lambda seen: seen.method == "GET" and "bundles" in seen.path, times=1,
                        cut_after=pushed.size // 2, reset=True))
        store = open_store(f"s3://{s3_bucket}/p?endpoint={proxy.url}&addressing=path", settings)
        transfer.pull(store, tmp_path / "dest", digest=pushed.digest, settings=settings)
        assert snapshot(tmp_path / "dest") == snapshot(src)
    finally:
        proxy.close()


class _RewrittenMidDownload:
    """A store whose bundle object another push rewrites (same bytes, another part size, so a new
    ETag) just after a reader's first read: what a push refreshing an old bundle does to every
    node downloading it at that moment."""

    def __init__(self, inner, rewrite) -> None:  # noqa: ANN001
        self._inner, self._rewrite = inner, rewrite
        self.bundle_reads = 0

    def open_read(self, key, **kwargs):  # noqa: ANN001, ANN003, ANN201
        stream = self._inner.open_read(key, **kwargs)
        if not key.startswith(layout.BUNDLES):
            return stream
        self.bundle_reads += 1
        if self.bundle_reads > 1:
            return stream
        rewrite = self._rewrite

        class _Stream:
            def __init__(self) -> None:
                self._done = False

            def _after_first_read(self) -> None:
                if not self._done:
                    self._done = True
                    rewrite(key)

            def read(self, *args):  # noqa: ANN002, ANN202
                data = stream.read(*args)
                self._after_first_read()
                return data

            def readinto(self, buffer):  # noqa: ANN001, ANN202
                n = stream.readinto(buffer)
                self._after_first_read()
                return n

            def __enter__(self):  # noqa: ANN204
                return self

            def __exit__(self, *exc) -> None:  # noqa: ANN002
                stream.close()

            def __getattr__(self, name: str):  # noqa: ANN204
                return getattr(stream, name)

        return _Stream()

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self._inner, name)


@pytest.mark.parametrize("where", ["s3_inprocess", "s3_server"])
def test_a_bundle_rewritten_while_it_downloads_is_downloaded_again(where, request, tmp_path, small_settings):
    """The ranged GETs after the rewrite fail If-Match (412); the pull starts over, verifies the new
    object against the digest and succeeds, instead of failing (and a job disabling its store)."""
    url = request.getfixturevalue(where)
    files = {f"k{i}/kernel.cubin": os.urandom(40_000) for i in range(20)}
    write_tree(tmp_path / "src", files)
    ranged = small_settings.replace(max_concurrency=1, max_attempts=2)  # one ranged GET at a time
    other_parts = ranged.replace(multipart_chunksize=128 << 10)
    with open_store(url, ranged) as store:
        pushed = transfer.push(store, tmp_path / "src", settings=ranged)
        assert pushed.size > 384 << 10  # large enough for ranged GETs pinned to the ETag
        data = store.read_bytes(layout.bundle_key(pushed.digest))

        def rewrite(key: str) -> None:
            with open_store(url, other_parts) as other:
                other.write(key, io.BytesIO(data), size=len(data))

        wrapped = _RewrittenMidDownload(store, rewrite)
        transfer.pull(wrapped, tmp_path / "dest", digest=pushed.digest, settings=ranged)
    assert wrapped.bundle_reads == 2
    assert snapshot(tmp_path / "dest") == snapshot(tmp_path / "src")


class _CountingStore:
    """Wraps a store and counts bundle downloads, to see work that a lock saved."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.bundle_reads = 0

    def open_read(self, key, **kwargs):
        if key.startswith(layout.BUNDLES):
            self.bundle_reads += 1
        return self._inner.open_read(key, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_ranks_of_one_node_download_a_bundle_once(tmp_path, src, small_settings):
    from concurrent.futures import ThreadPoolExecutor

    store = _CountingStore(open_store((tmp_path / "store").as_uri(), small_settings))
    pushed = transfer.push(store._inner, src, ref="r", settings=small_settings)
    node = tmp_path / "node-state"

    def rank(_):  # threads take separate node locks, as processes would
        return transfer.pull(store, tmp_path / "cache", ref="r", settings=small_settings, node_state=node)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(rank, range(4)))
    assert {r.digest for r in results} == {pushed.digest}
    assert store.bundle_reads == 1
    assert snapshot(tmp_path / "cache") == snapshot(src)

    (tmp_path / "cache/k3/kernel.cubin").unlink()  # someone cleaned part of the cache
    transfer.pull(store, tmp_path / "cache", ref="r", settings=small_settings, node_state=node)
    assert store.bundle_reads == 2 and snapshot(tmp_path / "cache") == snapshot(src)
