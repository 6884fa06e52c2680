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
