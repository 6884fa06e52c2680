"""``open_store``: URL dispatch, configuration errors, and staying import-cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bundler.config import Settings
from bundler.errors import ConfigError
from bundler.stores import LocalStore, open_store
from bundler.stores.s3 import S3Store


def test_local_urls_and_paths(tmp_path: Path) -> None:
    for url in (tmp_path.as_uri(), str(tmp_path)):
        store = open_store(url, Settings())
        assert isinstance(store, LocalStore) and store.root == tmp_path


def test_s3_url_with_query_parameters() -> None:
    store = open_store("s3://bkt/some/prefix/?endpoint=http://127.0.0.1:9000&addressing=path&region=eu-west-1", Settings())
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("bkt", "some/prefix")
    assert store._config.endpoint_url == "http://127.0.0.1:9000"
    assert store._config.addressing == "path" and store._config.region == "eu-west-1"
    plain = open_store("s3://bkt", Settings())
    assert plain.prefix == "" and plain._config.endpoint_url is None and plain._config.addressing is None


def test_remote_comes_from_settings_when_no_url(tmp_path: Path) -> None:
    store = open_store(None, Settings(remote=str(tmp_path)))
    assert isinstance(store, LocalStore)


def test_remote_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUNDLER_REMOTE", tmp_path.as_uri())
    assert isinstance(open_store(), LocalStore)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "--remote .*BUNDLER_REMOTE"),
        ("gs://bucket/x", "unsupported store URL"),
        ("s3://bucket/x?endpiont=http://x", "unknown parameter endpiont"),
        ("s3://bucket/x?addressing=sideways", "addressing='sideways'"),
        ("s3:///no-bucket", "needs a bucket"),
    ],
)
def test_configuration_errors(url: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store(url, Settings())


def test_import_and_open_do_not_load_boto3() -> None:
    code = (
        "import sys, bundler.stores; "
        "bundler.stores.open_store('s3://b/p?endpoint=http://127.0.0.1:1', bundler.stores.Settings()); "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 's3transfer')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
