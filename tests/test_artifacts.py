"""save_artifacts / load_artifacts: a warm cache moved without a bucket."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import triton

import bundler
from bundler import recording, relocate
from bundler.autotune import AutotuneCache, configs_hash
from bundler.bundle import archive
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


def _blob(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    archive.pack(entries, out)
    return out.getvalue()


def test_group_file_nested_too_deep_for_json_is_left_as_a_miss(tmp_path: Path) -> None:
    target = node_settings(tmp_path, "b", None)
    hostile = b"[" * 200_000
    manifest = bundler.load_artifacts(_blob({f"triton/{GROUP_KEY}/__grp__deep.json": hostile}), settings=target)
    assert len(manifest.files) == 1
    assert (target.triton_cache_dir / GROUP_KEY / "__grp__deep.json").read_bytes() == hostile


def test_group_file_over_a_mebibyte_is_not_parsed() -> None:
    padding = "x" * relocate.MAX_GROUP_BYTES
    huge = json.dumps({"child_paths": {"k.cubin": "/old/KEY/k.cubin"}, "pad": padding}).encode()
    assert relocate.to_local(huge, "/new/KEY") == huge
    assert relocate.to_portable(huge) == huge


def test_vanished_files_are_left_out_of_the_artifacts(tmp_path: Path) -> None:
    kept, gone = tmp_path / "kept.cubin", tmp_path / "gone.cubin"
    kept.write_bytes(b"k")
    entries = {"triton/K/kept.cubin": kept, "triton/K/gone.cubin": gone, "autotune/a.json": b"{}"}
    assert recording.still_existing(entries) == {"triton/K/kept.cubin": kept, "autotune/a.json": b"{}"}
