"""Settings without the dataclass (importing dataclasses cost every command ~25 ms): these pin
down what ``dataclass(frozen=True)`` gave it."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from pathlib import Path

import pytest

from bundler import config
from bundler.config import Settings
from bundler.errors import ConfigError


def test_every_field_has_a_variable_and_the_constructor_takes_exactly_them() -> None:
    fields = list(inspect.get_annotations(Settings))
    assert fields == list(config._ENV_NAMES) == list(config._PARSERS)
    s = Settings()
    assert all(hasattr(s, name) for name in fields)
    with pytest.raises(TypeError, match="zstd_lvl"):
        Settings(zstd_lvl=3)


def test_frozen_equal_hashable_and_picklable() -> None:
    s = Settings(zstd_level=5, cache_dir="/tmp/c", trusted_keys="ed25519:a,ed25519:b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.zstd_level = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del s.zstd_level
    assert s == Settings(zstd_level=5, cache_dir=Path("/tmp/c"), trusted_keys=("ed25519:a", "ed25519:b"))
    assert s != Settings() and s != object()
    assert hash(s) == hash(Settings(zstd_level=5, cache_dir="/tmp/c", trusted_keys="ed25519:a,ed25519:b"))
    assert pickle.loads(pickle.dumps(s)) == s
    assert isinstance(s.cache_dir, Path) and s.trusted_keys == ("ed25519:a", "ed25519:b")


def test_repr_names_every_field_but_the_secret() -> None:
    shown = repr(Settings(signing_key="hunter2"))
    assert "hunter2" not in shown and "signing_key=" not in shown
    assert shown.startswith("Settings(remote=None, connect_timeout=3.0,") and "log=None)" in shown


def test_replace_and_from_env_check_like_the_constructor() -> None:
    s = Settings().replace(zstd_level=9)
    assert s.zstd_level == 9 and s.cache_dir == Settings().cache_dir
    with pytest.raises(ConfigError):
        Settings().replace(max_ratio=1)
    with pytest.raises(TypeError):
        Settings().replace(no_such_field=1)
    assert Settings.from_env({"BUNDLER_ZSTD_LEVEL": "7"}, max_ratio=50) == Settings(zstd_level=7, max_ratio=50)


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_a_variable_set_to_blank_counts_as_unset(blank: str) -> None:
    """A launcher that blanks a variable means "unset": BUNDLER_CACHE_DIR="" must not be the current
    directory, BUNDLER_REMOTE="  " no folder named "  ", BUNDLER_LOCAL_CACHE="" not "off"."""
    names = ("BUNDLER_CACHE_DIR", "BUNDLER_REMOTE", "TRITON_CACHE_DIR", "BUNDLER_LOCAL_CACHE", "BUNDLER_ZSTD_LEVEL",
             "BUNDLER_MAX_BUNDLE_BYTES", "BUNDLER_PULL_BUDGET", "BUNDLER_LOG", "BUNDLER_REF")
    assert Settings.from_env({name: blank for name in names}) == Settings.from_env({})
    assert Settings.from_env({"BUNDLER_CACHE_DIR": blank}).cache_dir != Path(".")


@pytest.mark.parametrize("name", ["BUNDLER_SIGNING_KEY", "BUNDLER_SIGNING_KEY_FILE", "BUNDLER_TRUSTED_KEYS",
                                  "BUNDLER_REF_MAX_AGE"])
def test_a_blank_signing_variable_stays_an_error(name: str) -> None:
    """The exception: blanking a signing setting must not turn a signature check off silently."""
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: " "})


@pytest.mark.parametrize(("name", "raw", "allowed"), [
    ("BUNDLER_MAX_BUNDLE_BYTES", "0", "at least 1"),
    ("BUNDLER_MAX_MEMBERS", "-1", "at least 1"),
    ("BUNDLER_MAX_MEMBERS", "0", "at least 1"),
    ("BUNDLER_ZSTD_LEVEL", "99", "between -131072 and 22"),
    ("BUNDLER_ZSTD_LEVEL", "-131073", "between -131072 and 22"),
    ("BUNDLER_ZSTD_THREADS", "-7", "between 0 and 256"),
])
def test_limits_that_make_no_sense_are_refused_naming_the_variable_and_range(name: str, raw: str,
                                                                             allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}={raw} must be {allowed}"):
        Settings.from_env({name: raw})


def test_valid_limits_are_kept() -> None:
    s = Settings.from_env({"BUNDLER_MAX_BUNDLE_BYTES": "1", "BUNDLER_MAX_MEMBERS": "1", "BUNDLER_ZSTD_LEVEL": "-5",
                           "BUNDLER_ZSTD_THREADS": "0", "BUNDLER_LOCAL_CACHE": "0", "BUNDLER_BUNDLES": "0"})
    assert (s.max_bundle_bytes, s.max_members, s.zstd_level, s.zstd_threads) == (1, 1, -5, 0)
    assert s.local_cache is False
    assert Settings.from_env({"BUNDLER_ZSTD_LEVEL": "22"}).zstd_level == 22
    assert Settings.from_env({"BUNDLER_MAX_BUNDLE_BYTES": "16GiB"}).max_bundle_bytes == 16 << 30


def test_credentials_in_bundler_remote_are_refused_without_showing_the_secret() -> None:
    for remote in ("s3://AKIAEXAMPLE:wJalr/XUtn+FEMI@bucket/p", "s3://AKIAEXAMPLE:supersecret@bucket/p"):
        with pytest.raises(ConfigError, match="BUNDLER_REMOTE.*AWS_ACCESS_KEY_ID") as err:
            Settings.from_env({"BUNDLER_REMOTE": remote})
        assert "AKIAEXAMPLE:***@bucket/p" in str(err.value)
        assert "supersecret" not in str(err.value) and "XUtn" not in str(err.value) and "wJalr" not in str(err.value)


def test_triton_cache_dir_is_taken_as_triton_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton does not expand ``~`` in TRITON_CACHE_DIR (a value from a pod spec or a YAML file
    gets no shell): expanding it would unpack bundles where Triton never looks."""
    monkeypatch.setenv("TRITON_CACHE_DIR", "~/tcache")
    assert Settings.from_env().triton_cache_dir == Path("~/tcache")
    monkeypatch.setenv("BUNDLER_CACHE_DIR", "~/bcache")  # ours is ours to expand, as documented
    assert Settings.from_env().cache_dir == Path("~/bcache").expanduser()
