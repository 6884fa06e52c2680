"""The Triton integration with real Triton: interpreter-mode autotuning in fresh processes, and
genuine kernel caches (cubin, ptx, group files) compiled for sm_90 on this CPU."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.cache import FileCacheManager, RemoteCacheManager

import bundler
from bundler import relocate
from bundler.config import Settings
from bundler.integrations import triton as bt
from bundler.integrations import triton_cache, triton_remote
from bundler.integrations.triton_remote import StoreRemoteCacheBackend
from bundler.stores import open_store

import triton_kernels as tk
from _helpers_triton import node_settings, run_job

COLD_CALLS = 6  # 3 candidate configs x 2 sizes


# --- autotuning in the interpreter, one fresh process per node ---------------------------------


def test_fresh_node_pulls_the_bundle_and_autotunes_nothing(tmp_path: Path, s3_server: str) -> None:
    cold = run_job(node_settings(tmp_path, "a", s3_server), "--session")
    assert cold["phases"][0]["bench_calls"] == COLD_CALLS
    assert cold["session_hit"] is False and cold["pushed"]

    warm = run_job(node_settings(tmp_path, "b", s3_server), "--session")
    assert warm["session_hit"] is True
    assert warm["phases"][0]["bench_calls"] == 0
    assert warm["phases"][0]["winners"] == cold["phases"][0]["winners"]
    assert warm["stats"]["hits"] == 2 and warm["stats"]["misses"] == 0
    assert warm["time_saved_ns"] > 0 and warm["pushed"] is None


def test_per_kernel_remote_records_cover_pre_hook_configs_without_bundles(tmp_path: Path,
                                                                         local_store_url: str) -> None:
    # Configs with a pre_hook: Triton's own result cache never stores those; ours does.
    hooked = ("--phase", "configs=hooked")
    assert run_job(node_settings(tmp_path, "a", local_store_url, bundles=False), *hooked)["phases"][0][
        "bench_calls"] == COLD_CALLS
    warm = run_job(node_settings(tmp_path, "b", local_store_url, bundles=False), *hooked)
    assert warm["phases"][0]["bench_calls"] == 0 and warm["stats"]["hits"] == 2


def test_moved_cache_hits_and_each_version_fact_misses(tmp_path: Path) -> None:
    first = node_settings(tmp_path, "a", None)
    assert run_job(first)["phases"][0]["bench_calls"] == COLD_CALLS
    shutil.copytree(tmp_path / "a", tmp_path / "moved" / "deeper")

    moved = node_settings(tmp_path / "moved", "deeper", None)
    phases = ["", "triton=2.3.1", "backend=cuda-90-32-ptxas12.8", "configs=wider"]
    result = run_job(moved, *[arg for spec in phases for arg in ("--phase", spec)])
    calls = {p["spec"]: p["bench_calls"] for p in result["phases"]}
    assert calls == {
        "": 0,  # relocated local cache still hits
        "triton=2.3.1": COLD_CALLS,
        "backend=cuda-90-32-ptxas12.8": COLD_CALLS,
        "configs=wider": 8,  # another candidate list (4 configs x 2 sizes): a miss
    }
    assert run_job(moved.replace(tag="v2"))["phases"][0]["bench_calls"] == COLD_CALLS


# --- genuine kernel caches ---------------------------------------------------------------------


@pytest.fixture
def triton_env(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Restore Triton's cache-manager knob after a test that installs ours."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    saved = knobs.cache.__dict__.get("manager_class")
    yield monkeypatch
    if saved is None:
        knobs.cache.__dict__.pop("manager_class", None)
    else:
        knobs.cache.manager_class = saved


def compile_add(cache_dir: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache_dir))
    return triton.compile(ASTSource(tk.add_kernel, tk.ADD_SIGNATURE, {"BLOCK": 64}), target=GPUTarget("cuda", 90, 32))


def test_bundled_kernels_are_found_by_triton_at_another_path(tmp_path: Path, local_store_url: str, triton_env) -> None:  # noqa: ANN001
    bt.install()
    producer = node_settings(tmp_path, "a", local_store_url)
    with bundler.compile_session(code="kernels v1", settings=producer) as s:
        compiled = compile_add(producer.triton_cache_dir, triton_env)
    names = {f.path.rsplit("/", 1)[-1] for f in s.pushed.manifest.files}
    assert {"add_kernel.cubin", "add_kernel.ptx", "__grp__add_kernel.json"} <= names
    shutil.rmtree(producer.triton_cache_dir)

    consumer = node_settings(tmp_path, "b", local_store_url)
    with bundler.compile_session(code="kernels v1", settings=consumer) as s:
        assert s.hit
    # Triton's own manager, not ours, must find the relocated group and every child.
    knobs.cache.__dict__.pop("manager_class", None)
    triton_env.setenv("TRITON_CACHE_DIR", str(consumer.triton_cache_dir))
    key_dir = next(consumer.triton_cache_dir.iterdir()).name
    group = FileCacheManager(key_dir).get_group("add_kernel.json")
    assert group and all(p.startswith(str(consumer.triton_cache_dir)) for p in group.values())
    mtimes = {p: p.stat().st_mtime_ns for p in consumer.triton_cache_dir.rglob("*")}
    again = compile_add(consumer.triton_cache_dir, triton_env)
    assert again.hash == compiled.hash
    assert {p: p.stat().st_mtime_ns for p in consumer.triton_cache_dir.rglob("*")} == mtimes  # nothing recompiled


def test_group_file_relocation_round_trip(tmp_path: Path) -> None:
    original = {"child_paths": {"k.cubin": "/old/root/KEY/k.cubin", "k.json": "/old/root/KEY/k.json"}}
    portable = relocate.to_portable(json.dumps(original).encode())
    assert json.loads(portable)["child_paths"] == {"k.cubin": "k.cubin", "k.json": "k.json"}
    local = relocate.GroupFileRewriter()("triton/KEY/__grp__k.json", portable, tmp_path / "KEY" / "__grp__k.json")
    assert json.loads(local)["child_paths"]["k.cubin"] == str(tmp_path / "KEY" / "k.cubin")
    assert relocate.GroupFileRewriter().wants("triton/KEY/__grp__k.json")
    assert not relocate.GroupFileRewriter().wants("triton/KEY/k.json")


@pytest.mark.parametrize("child", ["..", "", 7, "a/b/..", "x/../..", "/"])
def test_hostile_group_file_becomes_a_miss(child: object) -> None:
    rewritten = relocate.to_local(json.dumps({"child_paths": {"k.cubin": child}}).encode(), "/cache/KEY")
    assert json.loads(rewritten)["child_paths"] is None


def test_group_file_cannot_point_outside_its_directory() -> None:
    rewritten = relocate.to_local(json.dumps({"child_paths": {"x": "/etc/passwd"}}).encode(), "/cache/KEY")
    assert json.loads(rewritten)["child_paths"] == {"x": "/cache/KEY/passwd"}


def test_remote_cache_backend_through_tritons_remote_manager(tmp_path: Path, local_store_url: str,
                                                            triton_env) -> None:  # noqa: ANN001
    triton_env.setenv("BUNDLER_REMOTE", local_store_url)
    triton_env.setenv("TRITON_REMOTE_CACHE_BACKEND",
                      "bundler.integrations.triton_remote:StoreRemoteCacheBackend")
    knobs.cache.manager_class = RemoteCacheManager
    compile_add(tmp_path / "node-a", triton_env)
    stored = [info.key for info in open_store(local_store_url).list("v1/triton/")]
    assert any(key.endswith("add_kernel.cubin") for key in stored)
    compile_add(tmp_path / "node-b", triton_env)  # an empty local cache: materialised from the store
    assert list((tmp_path / "node-b").rglob("add_kernel.cubin"))
    backend = StoreRemoteCacheBackend(stored[0].split("/")[2])
    assert backend.get(["no-such-file"]) == {}


def test_recording_manager_records_writes_and_hits(tmp_path: Path, triton_env) -> None:  # noqa: ANN001
    from bundler import recording

    triton_cache.install()
    triton_cache.install()  # idempotent: wraps FileCacheManager once
    assert triton_cache.RecordingCacheManager.inner_class is FileCacheManager
    for expected in ("writes", "hits"):
        with recording.attached(recording.Recorder()) as rec:
            compile_add(tmp_path, triton_env)
        names = rec.entries()
        assert any(n.endswith("/add_kernel.cubin") for n in names), expected
        group = next(v for n, v in names.items() if n.endswith("__grp__add_kernel.json"))
        assert str(tmp_path) not in group.decode()  # recorded in portable form


# --- review fixes: signing, odd names, dependency-aware kernel identity ---------------------------


def test_remote_cache_backend_loads_nothing_when_signatures_are_required(
        local_store_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BUNDLER_REMOTE", local_store_url)
    StoreRemoteCacheBackend("KEY").put("k.cubin", b"\x7fELF")
    assert StoreRemoteCacheBackend("KEY").get(["k.cubin"]) == {"k.cubin": b"\x7fELF"}
    monkeypatch.setattr(bundler.logs, "_warned", set())  # the warning is given once per process
    monkeypatch.setenv("BUNDLER_SIGNING_KEY", "secret")
    with caplog.at_level(logging.WARNING):
        assert StoreRemoteCacheBackend("KEY").get(["k.cubin"]) == {}
        assert StoreRemoteCacheBackend("KEY").get(["k.cubin"]) == {}
    assert len([r for r in caplog.records if "BUNDLER_SIGNING_KEY" in r.getMessage()]) == 1


@pytest.mark.parametrize("name", ["a" * 250 + ".cubin", "k$1.json", "../x", "sub/dir.ptx", "", "..", "\udc80"])
def test_every_triton_file_name_maps_to_a_valid_distinct_key(name: str) -> None:
    key = triton_remote.triton_object_key("KEY", name)
    assert key.startswith("v1/triton/KEY/sha256-")
    assert key != triton_remote.triton_object_key("KEY", name + "x")
    assert triton_remote.triton_object_key("KEY", key.rsplit("/", 1)[1]) != key  # hashed names hash again
    assert triton_remote.triton_object_key("KEY", "add.cubin") == "v1/triton/KEY/add.cubin"


def test_remote_cache_backend_round_trips_odd_names(local_store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUNDLER_REMOTE", local_store_url)
    odd = "k$" + "x" * 300
    StoreRemoteCacheBackend("KEY").put(odd, b"data")
    assert StoreRemoteCacheBackend("KEY").get([odd]) == {odd: b"data"}


_KERNELS = '''
import triton
import triton.language as tl

SCALE = tl.constexpr({scale})


@triton.jit
def helper(x):
    return x + {step}


@triton.jit
def kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, helper(tl.load(x_ptr + offsets)) * SCALE, mask=offsets < n)
'''


def _kernel_code_hash(directory: Path, **facts: int) -> str:
    import importlib.util

    directory.mkdir(parents=True)
    (directory / "kernels.py").write_text(_KERNELS.format(**{"scale": 2, "step": 1, **facts}))
    spec = importlib.util.spec_from_file_location(f"kernels_{directory.name}", directory / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tuner = triton.autotune(configs=tk.configs(), key=["n"])(module.kernel)
    return bt.TuningResults(tuner, node_settings(directory, "n", None))._kernel_identity()[2]


def test_kernel_identity_covers_jit_helpers_and_constexpr_globals(tmp_path: Path) -> None:
    base = _kernel_code_hash(tmp_path / "base")
    assert _kernel_code_hash(tmp_path / "same") == base
    assert _kernel_code_hash(tmp_path / "helper", step=2) != base
    assert _kernel_code_hash(tmp_path / "constexpr", scale=3) != base


def test_autotuners_that_prune_differently_do_not_share_winners(tmp_path: Path) -> None:
    """Two ``autotune`` wrappers of one kernel with the same candidates: one prunes before
    benchmarking (to configs that fit shared memory, say), one does not, and another names other
    key arguments. Each must keep its own record, or one loads a winner the other chose."""
    settings = Settings(cache_dir=tmp_path, bundles=False)
    plain = bt.autotune(configs=tk.configs(), key=["n"], settings=settings)(tk.add_kernel)
    pruned = bt.autotune(configs=tk.configs(), key=["n"], settings=settings,
                         prune_configs_by={"early_config_prune": _keep_first})(tk.add_kernel)
    plain_again = bt.autotune(configs=tk.configs(), key=["n"], settings=settings)(tk.add_kernel)
    keys_of = {name: tuner.cache._cache_for((100,)).key  # type: ignore[union-attr]
               for name, tuner in (("plain", plain), ("pruned", pruned), ("again", plain_again))}
    assert keys_of["plain"] == keys_of["again"]  # the same setup still shares its record
    assert keys_of["plain"] != keys_of["pruned"]


def _keep_first(configs, named_args, **kwargs):  # noqa: ANN001, ANN003, ANN202
    return configs[:1]
