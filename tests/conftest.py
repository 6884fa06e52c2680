"""Shared fixtures. Store fixtures: one conformance suite runs against every backend.

- ``local_store_url``: a temp directory (``LocalStore``).
- ``s3_inprocess``: moto's in-process mock (``mock_aws``), a fresh bucket.
- ``s3_server``: moto over real HTTP on 127.0.0.1 (one server per xdist worker), a fresh bucket per
  test, addressed with ``?endpoint=...&addressing=path`` like a self-hosted S3-compatible server.
- ``store_url``: each of the three in turn; ``store``: the opened store with ``small_settings``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

# moto reads this once at import: let multipart tests use small parts (S3 itself requires 5 MiB,
# except for the last part). Must be set before anything imports moto.
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(16 << 10))

import pytest  # noqa: E402

from bundler.config import Settings  # noqa: E402
from bundler.stores import Store, open_store  # noqa: E402
from bundler.stores.s3_client import clear_clients  # noqa: E402

BUCKET = "bundler-test"
REGION = "us-east-1"


@pytest.fixture
def small_settings() -> Settings:
    """Transfer sizes small enough that tests exercise multipart uploads and ranged GETs quickly."""
    return Settings(
        multipart_threshold=384 << 10,
        multipart_chunksize=64 << 10,
        max_concurrency=4,
        connect_timeout=2.0,
        read_timeout=5.0,
        max_attempts=3,
    )


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Fake credentials, no real AWS config files, no instance metadata lookups, no cached clients."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "BUNDLER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    clear_clients()
    yield
    clear_clients()


@pytest.fixture
def local_store_url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def s3_inprocess(aws_env: None) -> Iterator[str]:
    from moto import mock_aws

    with mock_aws():
        _boto_client().create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}/some/prefix"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, shared by the tests of one worker."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, aws_env: None) -> str:
    """A fresh bucket on the moto server."""
    bucket = f"bundler-{uuid.uuid4().hex[:16]}"
    _boto_client(moto_endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_server(moto_endpoint: str, s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/some/prefix?endpoint={moto_endpoint}&addressing=path"


@pytest.fixture(params=["local", "s3_inprocess", "s3_server"])
def store_url(request: pytest.FixtureRequest) -> str:
    fixture = {"local": "local_store_url"}.get(request.param, request.param)
    return request.getfixturevalue(fixture)


@pytest.fixture
def store(store_url: str, small_settings: Settings) -> Iterator[Store]:
    with open_store(store_url, small_settings) as opened:
        yield opened


def _boto_client(endpoint: str | None = None):  # noqa: ANN202 - botocore client, untyped
    """A plain boto3 client for test setup and for looking behind the store's back."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def boto_client():  # noqa: ANN201
    """``boto_client(endpoint)`` for setup and inspection (multipart leftovers, raw objects)."""
    return _boto_client


@pytest.fixture
def inductor_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """In-process torch tests: Inductor's cache and default dirs inside tmp_path; Dynamo reset
    before and after. torch is imported here, not at the top: most tests never need it."""
    import tempfile

    import torch

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "ATEN_CPU_CAPABILITY", "BUNDLER_STRICT",
                 "BUNDLER_TAG", "BUNDLER_REMOTE", "BUNDLER_REF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    torch._dynamo.reset()
    yield tmp_path / "inductor"
    torch._dynamo.reset()
