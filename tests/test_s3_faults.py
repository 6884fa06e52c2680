"""S3Store under failure, grouped by failure class, against real sockets on 127.0.0.1.

Faults come from ``fault_proxy.FaultProxy`` in front of the moto server (moto supplies the real S3
behaviour, the proxy breaks it on cue), from a listener that never answers, and from a closed port.
Time bounds below are bounds on failure paths computed from the configured timeouts, not
performance assertions.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pytest

from bundler.config import Settings
from bundler.errors import (
    AccessDeniedError,
    NoSuchBucketError,
    NotFoundError,
    NotFoundOrDeniedError,
    ObjectReplacedError,
    StoreUnreachableError,
)
from bundler.remote import health, refs, transfer
from bundler.stores import open_store
from bundler.stores import s3_client as s3_client_module
from bundler.stores.s3 import S3Store

from fault_proxy import Fault, FaultProxy, Seen, refused_endpoint, silent_server

LARGE = (700 << 10) + 13  # above small_settings.multipart_threshold: multipart / ranged GETs
SMALL = 100 << 10


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    faulty = FaultProxy(moto_endpoint)
    yield faulty
    faulty.close()


@pytest.fixture
def proxied(proxy: FaultProxy, s3_bucket: str, small_settings: Settings) -> S3Store:
    """A store whose every request passes through the fault proxy."""
    store = open_store(f"s3://{s3_bucket}/p?endpoint={proxy.url}&addressing=path", small_settings)
    assert isinstance(store, S3Store)
    return store


def is_get(seen: Seen) -> bool:
    return seen.method == "GET" and "list-type" not in seen.query


def is_put_object(seen: Seen) -> bool:
    return seen.method == "PUT" and "partNumber" not in seen.query


# --- server errors and throttling ----------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (503, "SlowDown")])
def test_transient_server_errors_are_retried(proxy: FaultProxy, proxied: S3Store, status: int, code: str) -> None:
    proxy.add(Fault(when=is_put_object, times=2, status=status, code=code))
    proxy.add(Fault(when=is_get, times=2, status=status, code=code))
    assert proxied.write_bytes("k", b"payload") is True
    assert proxied.read_bytes("k") == b"payload"
    assert len(proxy.requests("PUT")) == 3 and len(proxy.requests("GET")) == 3


def test_persistent_throttling_gives_up_after_max_attempts(proxy: FaultProxy, proxied: S3Store) -> None:
    proxy.add(Fault(when=is_put_object, times=None, status=503, code="SlowDown"))
    with pytest.raises(StoreUnreachableError, match="throttling") as err:
        proxied.write_bytes("k", b"payload")
    assert "BUNDLER_RETRY_MODE" in str(err.value)
    assert len(proxy.requests("PUT")) == proxied.settings.max_attempts


# --- bodies that break off mid-download ----------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["truncated", "reset"])
def test_broken_single_stream_resumes_at_offset(proxy: FaultProxy, proxied: S3Store, reset: bool) -> None:
    data = os.urandom(SMALL)
    proxied.write_bytes("k", data)
    proxy.add(Fault(when=is_get, cut_after=30_000, reset=reset))
    assert proxied.read_bytes("k") == data
    first, resumed = proxy.requests("GET")
    assert "range" not in first.headers
    assert resumed.headers["range"].startswith("bytes=") and resumed.headers["range"] != "bytes=0-"
    assert resumed.headers["if-match"]  # pinned to the version the first GET returned


@pytest.mark.parametrize("reset", [False, True], ids=["truncated", "reset"])
def test_broken_range_is_refetched(proxy: FaultProxy, proxied: S3Store, reset: bool) -> None:
    data = os.urandom(LARGE)
    proxied.write("k", io.BytesIO(data))
    target = "bytes=196608-262143"  # the fourth 64 KiB part
    proxy.add(Fault(when=lambda seen: seen.headers.get("range") == target, cut_after=1000, reset=reset))
    assert proxied.read_bytes("k") == data
    ranges = [seen.headers.get("range") for seen in proxy.requests("GET")]
    assert ranges.count(target) == 2
    assert all(seen.headers.get("if-match") for seen in proxy.requests("GET") if "range" in seen.headers)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["single", "ranged"])
def test_body_that_keeps_breaking_fails_cleanly_never_with_wrong_bytes(
    proxy: FaultProxy, proxied: S3Store, size: int
) -> None:
    data = os.urandom(size)
    proxied.write_bytes("k", data)
    proxy.add(Fault(when=is_get, times=None, cut_after=20_000))
    received = bytearray()
    with pytest.raises(StoreUnreachableError, match="did not answer"), proxied.open_read("k") as stream:
        while chunk := stream.read(4096):
            received += chunk
    assert data.startswith(bytes(received))


def test_object_replaced_mid_download_fails_cleanly(s3_server: str, small_settings: Settings) -> None:
    store = open_store(s3_server, small_settings)
    store.write_bytes("k", os.urandom(LARGE))
    with pytest.raises(ObjectReplacedError, match="replaced while it was being read; retry the read"), \
            store.open_read("k") as stream:
        stream.read(1)  # parts 0..max_concurrency are requested now, the rest only as we consume
        store.write_bytes("k", os.urandom(LARGE))
        stream.read()


# --- endpoints that do not answer ----------------------------------------------------------------


def test_silent_endpoint_fails_within_the_timeout_budget(aws_env: None) -> None:
    settings = Settings(connect_timeout=0.5, read_timeout=0.5, max_attempts=2)
    # attempts * (connect + read) plus botocore's backoff (at most 1 s before the second attempt)
    budget = settings.max_attempts * (settings.connect_timeout + settings.read_timeout) + 1 + 2
    with silent_server() as endpoint:
        store = open_store(f"s3://b/p?endpoint={endpoint}&addressing=path", settings)
        started = time.monotonic()
        with pytest.raises(StoreUnreachableError) as err:
            store.read_bytes("k")
        assert time.monotonic() - started < budget
    assert endpoint in str(err.value) and "BUNDLER_READ_TIMEOUT=0.5s" in str(err.value)


def test_refused_connection_is_unreachable(aws_env: None) -> None:
    endpoint = refused_endpoint()
    store = open_store(f"s3://b/p?endpoint={endpoint}&addressing=path", Settings(max_attempts=2))
    started = time.monotonic()
    with pytest.raises(StoreUnreachableError, match="did not answer"):
        store.write_bytes("k", b"x")
    assert time.monotonic() - started < 5


# --- configuration mistakes ----------------------------------------------------------------------


def test_missing_bucket_is_named(moto_endpoint: str, aws_env: None, small_settings: Settings) -> None:
    store = open_store(f"s3://no-such-bucket-here/p?endpoint={moto_endpoint}&addressing=path", small_settings)
    for action in (lambda: store.write_bytes("k", b"x"), lambda: store.read_bytes("k"), lambda: list(store.list())):
        with pytest.raises(NoSuchBucketError, match="'no-such-bucket-here' does not exist") as err:
            action()
        assert moto_endpoint in str(err.value)


def test_access_denied_names_action_and_key(proxy: FaultProxy, proxied: S3Store) -> None:
    proxy.add(Fault(when=lambda seen: True, times=None, status=403, code="AccessDenied"))
    with pytest.raises(AccessDeniedError, match=r"PutObject .*p/k.*s3:PutObject"):
        proxied.write_bytes("k", b"x")
    with pytest.raises(AccessDeniedError, match=r"ListObjectsV2 .*s3:ListBucket on the bucket \(arn:aws:s3:::"):
        list(proxied.list("v1/refs/"))
    # A 403 to a read of one key may mean "missing" (see the tests below): a miss that says both.
    with pytest.raises(NotFoundOrDeniedError, match=r"p/v1/refs/a.json.*may not read it.*s3:GetObject"):
        proxied.read_bytes("v1/refs/a.json")


# --- callers without s3:ListBucket: a missing key answers 403 --------------------------------------


@pytest.fixture
def no_list_bucket(proxy: FaultProxy, moto_endpoint: str, boto_client) -> None:  # noqa: ANN001
    """Answer a GET or HEAD of a key that does not exist with 403 AccessDenied, as real S3 does to a
    caller without s3:ListBucket (moto answers 404: it does not model that). Whether the key exists
    is asked of moto itself at each request; every other request goes to moto untouched."""
    from botocore.exceptions import ClientError

    client = boto_client(moto_endpoint)

    def missing_key_read(seen: Seen) -> bool:
        parts = urlsplit(seen.path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        if seen.method not in ("GET", "HEAD") or not key or "uploadId" in parts.query:
            return False
        try:
            client.head_object(Bucket=bucket, Key=key)
        except ClientError:
            return True
        return False

    proxy.add(Fault(when=missing_key_read, times=None, status=403, code="AccessDenied"))


def test_a_403_for_a_missing_key_is_a_miss_and_warned_about_once(
    no_list_bucket: None, proxied: S3Store, small_settings: Settings, tmp_path, caplog  # noqa: ANN001
) -> None:
    with caplog.at_level("WARNING", logger="bundler.stores.s3_errors"):
        assert proxied.head(f"v1/bundles/{'0' * 64}.tar.zst") is None  # HEAD: no body, botocore's code is "403"
        with pytest.raises(NotFoundError, match="missing, or these credentials may not read it.*s3:ListBucket"):
            proxied.read_bytes("v1/refs/nope.json")  # GET: code AccessDenied
        with pytest.raises(NotFoundError):
            refs.read_ref(proxied, "nope", small_settings)
        # A push: HEAD before the create-only PUT, then the ref's write reads the old ref (a floor).
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.txt").write_text("hello")
        pushed = transfer.push(proxied, src, ref="r1", settings=small_settings)
        assert pushed.uploaded is True
        assert refs.read_ref(proxied, "r1", small_settings).digest == pushed.digest
        assert transfer.pull(proxied, tmp_path / "out", ref="r1", settings=small_settings).digest == pushed.digest
    warnings = [r for r in caplog.records if r.name == "bundler.stores.s3_errors"]
    assert len(warnings) == 1 and "answered 403" in warnings[0].getMessage()
    assert "s3:GetObject" in warnings[0].getMessage()


def test_a_403_for_a_missing_key_does_not_trip_the_read_breaker(
    no_list_bucket: None, proxied: S3Store, small_settings: Settings
) -> None:
    """The reviewer's case: the first autotune miss of a job made the whole process stop reading."""
    settings = small_settings.replace(remote=proxied.url)
    health.reset()
    try:
        proxied.write_bytes("v1/autotune/present.json", b"{}")
        miss = health.guarded(settings, "read", "v1/autotune/missing.json",
                              lambda: proxied.read_bytes("v1/autotune/missing.json"))
        assert miss is None and health.remote_usable(settings, "read")
        assert proxied.read_bytes("v1/autotune/present.json") == b"{}"
    finally:
        health.reset()


def test_rejected_credentials_say_how_to_configure(proxy: FaultProxy, proxied: S3Store) -> None:
    proxy.add(Fault(when=lambda seen: True, times=None, status=403, code="InvalidAccessKeyId"))
    with pytest.raises(AccessDeniedError, match="credentials were rejected.*AWS_ACCESS_KEY_ID"):
        proxied.read_bytes("k")


def test_no_credentials_at_all(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AccessDeniedError, match="no usable AWS credentials.*AWS_PROFILE"):
        open_store(s3_server, Settings(max_attempts=1)).read_bytes("k")


# --- servers without conditional writes ----------------------------------------------------------


@pytest.mark.parametrize("size", [10, LARGE], ids=["put", "multipart"])
def test_no_conditional_writes_falls_back_to_head_then_write(
    proxy: FaultProxy, proxied: S3Store, boto_client, moto_endpoint: str, s3_bucket: str, size: int
) -> None:
    proxy.add(Fault(when=lambda seen: "if-none-match" in seen.headers, times=None, status=501, code="NotImplemented"))
    first, second = os.urandom(size), os.urandom(size)
    assert proxied.write("k", io.BytesIO(first), if_absent=True) is True
    assert proxied.write("k", io.BytesIO(second), if_absent=True) is False
    assert proxied.read_bytes("k") == first
    # Only the first write tried the condition; the endpoint is then remembered as lacking it.
    assert len([seen for seen in proxy.seen if "if-none-match" in seen.headers]) == 1
    assert boto_client(moto_endpoint).list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


# --- multipart failures leave nothing ------------------------------------------------------------


def test_failed_multipart_upload_is_aborted(
    proxy: FaultProxy, proxied: S3Store, boto_client, moto_endpoint: str, s3_bucket: str
) -> None:
    proxy.add(Fault(when=lambda seen: "partNumber=3" in seen.query, times=None, status=403, code="AccessDenied"))
    with pytest.raises(AccessDeniedError, match="UploadPart"):
        proxied.write("k", io.BytesIO(os.urandom(LARGE)))
    assert proxied.head("k") is None
    assert boto_client(moto_endpoint).list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert proxy.requests("DELETE", lambda seen: "uploadId" in seen.query)


def test_upload_sends_sha256_checksums(proxy: FaultProxy, proxied: S3Store) -> None:
    proxied.write_bytes("small", b"x")
    proxied.write("large", io.BytesIO(os.urandom(LARGE)))
    puts = proxy.requests("PUT")
    assert puts and all("x-amz-checksum-sha256" in seen.headers for seen in puts)


# --- the shared client ---------------------------------------------------------------------------


def test_client_is_shared_per_configuration_and_rebuilt_after_fork(
    s3_server: str, small_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = open_store(s3_server, small_settings)._client
    assert open_store(s3_server, small_settings)._client is one
    assert open_store(s3_server, small_settings.replace(read_timeout=9.0))._client is not one
    monkeypatch.setattr(s3_client_module, "_pid", -1)  # as seen from a forked child
    assert open_store(s3_server, small_settings)._client is not one
