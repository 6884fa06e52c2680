"""Which installed cache entries a process never looked up (torch_lookups), with real torch.

- the recorder wraps the running torch's lookup functions, sees the FX graph and AOTAutograd keys a
  real CPU ``torch.compile`` looks up (hit or miss), and puts the originals back when it stops;
- autotune records: a real ``AutotuneCache`` read here, or pickled back from a compile worker;
- the ``never looked up`` arithmetic from a bundle's member names, and "unknown" where this torch's
  lookup function is not the one we know;
- the session: a bundle installed in process, then a job that uses it and one that does not.

The compiles are matrix products only: Inductor generates no C++ for them (extern kernels), so a
cold compile takes seconds.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from _torch_helpers import matmul  # noqa: E402

from bundler.integrations import torch as bt  # noqa: E402
from bundler.integrations import torch_lookups as tl  # noqa: E402


def _matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.t()


def _train_step(fn, width: int = 4) -> None:  # noqa: ANN001
    """Forward and backward of ``fn`` compiled afresh: one AOTAutograd entry, two FX graphs."""
    torch._dynamo.reset()
    a = torch.randn(width, width, requires_grad=True)
    out = torch.compile(fn)(a, torch.randn(width, width))
    out.sum().backward()


def _members(root: Path) -> list[str]:
    """Member names of the files under an Inductor dir, as a torch bundle names them."""
    return sorted(f"inductor/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file())


def _raw(target: tl._Target) -> object:
    import importlib

    return getattr(importlib.import_module(target.module), target.owner).__dict__[target.attr]


def test_the_recorder_sees_the_keys_a_real_compile_looks_up_and_restores_torch(inductor_dir: Path) -> None:
    originals = {target: _raw(target) for target in tl._TARGETS}
    with tl.LookupRecorder() as recorder:
        assert all(_raw(target) is not originals[target] for target in tl._TARGETS), "not wrapped"
        _train_step(matmul)  # cold: every lookup misses, and is recorded all the same
    assert all(_raw(target) is originals[target] for target in tl._TARGETS), "not restored"
    on_disk = tl.installed_keys(_members(inductor_dir))
    assert len(on_disk[tl.FX]) == 2 and len(on_disk[tl.AOT]) == 1, _members(inductor_dir)
    seen = recorder.seen()
    assert on_disk[tl.FX] <= seen[tl.FX] and on_disk[tl.AOT] <= seen[tl.AOT], seen
    assert seen[tl.AUTOTUNE] == set()  # watched, but a CPU compile has no Triton kernels

    _train_step(matmul)  # after stop: nothing more is recorded
    assert recorder.seen() == seen


def test_installed_entries_another_job_never_looks_up_are_counted(inductor_dir: Path) -> None:
    _train_step(matmul)
    installed = _members(inductor_dir)  # what a bundle of this cache would install
    with tl.LookupRecorder() as other_job:
        _train_step(_matmul_t)  # another graph: other keys
    assert tl.summary_phrase(installed, other_job) == "never looked up: 2 of 2 FX graphs, 1 of 1 AOT entries"
    from torch._dynamo.utils import counters

    hits = counters["aot_autograd"]["autograd_cache_hit"]
    with tl.LookupRecorder() as same_job:
        _train_step(matmul)  # the same graph: AOTAutograd hit, which loads both FX graphs by key
    assert counters["aot_autograd"]["autograd_cache_hit"] == hits + 1
    assert tl.summary_phrase(installed, same_job) == "never looked up: 0 of 2 FX graphs, 0 of 1 AOT entries"


def test_autotune_records_read_here_or_pickled_back_from_a_worker(inductor_dir: Path) -> None:
    from torch._inductor.runtime.autotune_cache import AutotuneCache

    kernel = inductor_dir / "ab" / "cabkernel.py"
    kernel.parent.mkdir(parents=True)
    kernel.write_text("# a kernel\n")
    meta = {"autotune_local_cache": True, "autotune_remote_cache": False}
    with tl.LookupRecorder() as recorder:
        cache = AutotuneCache.create(meta, str(kernel), "configs-hash")
        assert cache is not None and cache.local_cache is not None
        assert cache._read() is None  # no record yet: a lookup all the same
    path = Path(cache.local_cache[1])
    assert path.parent == kernel.parent and path.name.endswith(".best_config")
    member = f"inductor/{path.relative_to(inductor_dir).as_posix()}"
    assert tl.installed_keys([member])[tl.AUTOTUNE] == {f"ab/{path.name}"}
    assert recorder.seen()[tl.AUTOTUNE] == {f"ab/{path.name}"}
    assert tl.summary_phrase([member], recorder) == "never looked up: 0 of 1 autotune records"

    data = pickle.dumps(cache)  # what a compile worker sends back after reading the record there
    with tl.LookupRecorder() as parent:
        pickle.loads(data)
    assert parent.seen()[tl.AUTOTUNE] == {f"ab/{path.name}"}


def test_never_looked_up_arithmetic_from_member_names() -> None:
    members = [
        "inductor/fxgraph/ab/fab1/e1", "inductor/fxgraph/ab/fab1/e2",  # one key, two guard sets
        "inductor/fxgraph/cd/fcd2/e", "inductor/fxgraph/ef/fef3/e",
        "inductor/aotautograd/aaa1/e", "inductor/aotautograd/aaa2/e",
        "inductor/ab/k1.best_config", "inductor/cd/k2.best_config", "inductor/cd/k2.py",
        "inductor/ab/cab.main.so", "pch/c1.h.gch", "triton/K/k.cubin", "inductor/fxgraph/stray",
    ]
    installed = tl.installed_keys(members)
    assert installed == {tl.FX: {"fab1", "fcd2", "fef3"}, tl.AOT: {"aaa1", "aaa2"},
                         tl.AUTOTUNE: {"ab/k1.best_config", "cd/k2.best_config"}}
    seen = {tl.FX: {"fab1", "fzzz"}, tl.AOT: {"aaa1", "aaa2"}, tl.AUTOTUNE: None}
    assert tl.never_looked_up(installed, seen) == {tl.FX: {"fcd2", "fef3"}, tl.AOT: set(), tl.AUTOTUNE: None}
    with tl.LookupRecorder() as recorder:
        recorder.record(tl.FX, "fab1")
        recorder.record(tl.AUTOTUNE, "cd/k2.best_config")
    assert tl.summary_phrase(members, recorder) == (
        "never looked up: 2 of 3 FX graphs, 2 of 2 AOT entries, 1 of 2 autotune records")
    assert tl.summary_phrase(members, None) == (
        "never looked up: unknown for 3 FX graphs, unknown for 2 AOT entries, unknown for 2 autotune records")
    assert tl.summary_phrase(["inductor/ab/cab.main.so", "pch/c1.h.gch"], recorder) == ""


def test_a_lookup_function_this_torch_does_not_have_is_unknown_not_guessed(
    inductor_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another torch: ``_lookup_graph`` with other parameters. Left alone, its layer unknown."""
    from torch._inductor.codecache import FxGraphCache

    def _lookup_graph(graph_key: str, local: bool) -> None:  # not the signature we know
        raise AssertionError("never called here")

    other = staticmethod(_lookup_graph)
    monkeypatch.setattr(FxGraphCache, "_lookup_graph", other)
    with tl.LookupRecorder() as recorder:
        assert FxGraphCache.__dict__["_lookup_graph"] is other
        seen = recorder.seen()
    assert seen[tl.FX] is None and seen[tl.AOT] == set() and seen[tl.AUTOTUNE] == set()
    assert tl.summary_phrase(["inductor/fxgraph/ab/fab/e", "inductor/aotautograd/a1/e"], recorder) == (
        "never looked up: unknown for 1 FX graphs, 1 of 1 AOT entries")


def test_nested_recorders_share_the_wrappers_and_the_last_one_removes_them(inductor_dir: Path) -> None:
    target = tl._TARGETS[0]
    original = _raw(target)
    outer = tl.LookupRecorder().start()
    inner = tl.LookupRecorder().start()
    wrapped = _raw(target)
    assert wrapped is not original
    inner.stop()
    assert _raw(target) is wrapped
    outer.stop()
    assert _raw(target) is original


def test_the_session_summary_says_which_installed_entries_were_never_looked_up(
    inductor_dir: Path, local_store_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In process: bake a bundle, then install it into empty dirs for a job that uses it and for
    one that compiles another graph."""
    with bt.CompileCache(local_store_url, background=False) as producer:
        _train_step(matmul)
    assert producer.status == "miss" and "pushed" in producer.summary_line(), producer.summary_line()

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "consumer"))
    with bt.CompileCache(local_store_url, background=False, push=False) as consumer:
        _train_step(matmul)
    assert consumer.status == "hit", consumer.reason
    assert "never looked up: 0 of 2 FX graphs, 0 of 1 AOT entries" in consumer.summary_line()

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    with bt.CompileCache(local_store_url, background=False, push=False) as unused:
        _train_step(_matmul_t)
    assert unused.status == "hit", unused.reason
    assert "never looked up: 2 of 2 FX graphs, 1 of 1 AOT entries" in unused.summary_line()
