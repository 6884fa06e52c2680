"""Store URLs at their edges: credentials in them, empty or malformed parameters.

A URL is printed in logs, error messages and CI settings, so one carrying ``user:secret@`` is
refused, and the secret appears nowhere, not even in the refusal. An empty parameter is a mistake,
never a silent fallback to AWS.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bundler.config import Settings, redact_url
from bundler.errors import ConfigError
from bundler.stores import open_store
from bundler.stores.s3 import S3Store

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY@EXAMPLEKEY"


@pytest.mark.parametrize("url", [
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/prefix",
    "s3://AKIAEXAMPLE:supersecret@bucket/prefix?endpoint=http://127.0.0.1:9000",
    f"file://AKIAEXAMPLE:{SECRET}@localhost/tmp/x",
    "s3://bucket/prefix?endpoint=http://minio:supersecret@127.0.0.1:9000",
])
def test_credentials_in_a_store_url_are_refused_without_showing_them(url: str, aws_env: None) -> None:
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE") as err:
        open_store(url, Settings())
    message = str(err.value)
    assert ":***@" in message
    assert "supersecret" not in message and "wJalr" not in message and "EXAMPLEKEY" not in message


def test_s3store_from_url_refuses_them_too(aws_env: None) -> None:
    with pytest.raises(ConfigError, match="carries credentials") as err:
        S3Store.from_url("s3://AKIAEXAMPLE:supersecret@bucket/p", Settings())
    assert "supersecret" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        S3Store("AKIAEXAMPLE:supersecret", "p", settings=Settings())  # a secret where the bucket goes
    assert "supersecret" not in str(err.value)


def test_the_cli_refuses_them_without_echoing_the_secret(aws_env: None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bundler", "ls", "--remote", f"s3://AKIAEXAMPLE:{SECRET}@bucket/p"],
        capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert result.returncode == 2 and "carries credentials" in result.stderr
    assert "wJalr" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url(f"s3://AKIAEXAMPLE:{SECRET}@bucket/p?region=x") == "s3://AKIAEXAMPLE:***@bucket/p?region=x"
    assert redact_url("s3://bucket/team@x/p") == "s3://bucket/team@x/p"  # an '@' in the prefix is no userinfo
    assert redact_url("http://user@host:9000") == "http://user@host:9000"
    assert redact_url("/plain/path@1") == "/plain/path@1"


@pytest.mark.parametrize(("url", "named"), [
    ("s3://bucket?endpoint=", "endpoint="),
    ("s3://bucket/p?region=", "region="),
    ("s3://bucket/p?addressing=%20", "addressing="),
])
def test_an_empty_parameter_is_refused_not_a_fallback_to_aws(url: str, named: str, aws_env: None) -> None:
    with pytest.raises(ConfigError, match=f"gives {named} with no value.*AWS itself"):
        open_store(url, Settings())


@pytest.mark.parametrize("endpoint", ["localhost:9000", "ftp://host", "http://"])
def test_an_endpoint_that_is_no_server_url_is_refused_before_any_request(endpoint: str, aws_env: None) -> None:
    with pytest.raises(ConfigError, match=r"is not a server URL: write it as http\(s\)://host\[:port\]"):
        open_store(f"s3://bucket/p?endpoint={endpoint}", Settings())


def test_valid_urls_still_open(aws_env: None) -> None:
    store = open_store("s3://my_bucket.v2/a/b?endpoint=https://s3.example.com:9000/&addressing=path&region=eu-1",
                       Settings())
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == ("my_bucket.v2", "a/b")
    assert store._config.endpoint_url == "https://s3.example.com:9000/" and store._config.region == "eu-1"
