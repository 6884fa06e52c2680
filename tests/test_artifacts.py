"""save_artifacts / load_artifacts: a warm cache moved without a bucket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import triton

import bundler
from bundler import recording
from bundler.autotune import AutotuneCache, configs_hash
from bundler.errors import BundleError

from _helpers_triton import GROUP_KEY, fake_kernel, node_settings

CONFIGS = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]


def test_blob_carries_autotune_records_and_kernels_to_another_path(tmp_path: Path) -> None:
    source = node_settings(tmp_path, "a", None)
    cache = AutotuneCache.create({"kernel": "artifacts"}, "k.py", configs_hash(CONFIGS), settings=source)
    cache.save(CONFIGS[1], 1_000)
    for path in fake_kernel(source, name="artifact_add").values():
        recording.record_file(path, source)

    blob = bundler.save_artifacts(settings=source)
    target = node_settings(tmp_path, "b", None)
    manifest = bundler.load_artifacts(blob, settings=target)

    assert f"autotune/{cache.key}.json" in {f.path for f in manifest.files}
    moved = AutotuneCache.create({"kernel": "artifacts"}, "k.py", configs_hash(CONFIGS), settings=target)
    assert moved.read_best(CONFIGS) is CONFIGS[1]
    group = json.loads((target.triton_cache_dir / GROUP_KEY / "__grp__artifact_add.json").read_text())
    assert group["child_paths"]["artifact_add.cubin"] == str(target.triton_cache_dir / GROUP_KEY / "artifact_add.cubin")


def test_bad_blob_is_rejected_and_changes_nothing(tmp_path: Path) -> None:
    target = node_settings(tmp_path, "b", None)
    with pytest.raises(BundleError):
        bundler.load_artifacts(b"\x28\xb5\x2f\xfd" + b"not a bundle" * 10, settings=target)
    assert not target.cache_dir.exists() and not target.triton_cache_dir.exists()
