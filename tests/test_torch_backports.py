"""The upstream Inductor fix the torch session carries (bundler.integrations.torch_backports).

pytorch#172819: after an FX graph cache hit, a statically launched kernel whose ``.best_config``
was found by coordinate descent lost that mark, so every warm start tuned it again (on an H200,
torch 2.11: 6 of 28 kernels, and a fresh node at another path compiled 12 Triton kernels anew).
The fixed method is exercised here on real Inductor objects: a real ``.best_config`` written by
Inductor's own ``AutotuneCache.save`` and read back through Inductor's ``check_autotune_cache``,
real ``triton.Config`` objects. The kernel object itself needs a GPU, so it is the one stand-in:
a plain object with the attributes the method reads.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from torch._inductor.runtime import triton_heuristics as th  # noqa: E402
from torch._inductor.runtime.autotune_cache import AutotuneCache  # noqa: E402

from bundler.integrations import torch_backports  # noqa: E402


def _kernel(tmp_path: Path, configs: list) -> types.SimpleNamespace:
    """What recheck_autotune_cache reads of a CachingAutotuner restored from the FX cache."""
    source = tmp_path / "ab" / "cabcdef.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("# a generated kernel module\n")
    return types.SimpleNamespace(
        compile_results=[types.SimpleNamespace(config=config) for config in configs],
        filename=str(source), inductor_meta={"coordinate_descent_tuning": True},
        autotune_cache_info=None, is_statically_launchable=lambda: True,
    )


def _implementations() -> list:
    """Ours, and torch's own where the installed torch has the fix: they must agree."""
    found = [torch_backports.recheck_autotune_cache]
    upstream = th.CachingAutotuner.recheck_autotune_cache
    if upstream is not torch_backports.recheck_autotune_cache and not torch_backports.needs_coordesc_fix(upstream):
        found.append(upstream)
    return found


def _save_best(kernel: types.SimpleNamespace, configs: list, best, found_by_coordesc: bool) -> None:  # noqa: ANN001
    cache = AutotuneCache.create(kernel.inductor_meta, kernel.filename, th.hash_configs(configs))
    assert cache is not None
    cache.save(best, 1_000_000, found_by_coordesc=found_by_coordesc)


@pytest.fixture(autouse=True)
def _inductor_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


@pytest.mark.parametrize("recheck", _implementations())
def test_a_coordesc_winner_among_the_compiled_configs_keeps_its_mark(tmp_path: Path, recheck) -> None:  # noqa: ANN001
    configs = [triton.Config({"XBLOCK": 32}, num_warps=4), triton.Config({"XBLOCK": 64}, num_warps=4)]
    kernel = _kernel(tmp_path, configs)
    _save_best(kernel, configs, triton.Config({"XBLOCK": 64}, num_warps=4), found_by_coordesc=True)
    recheck(kernel, reload_kernel_from_src=None)
    assert [r.config for r in kernel.compile_results] == [configs[1]]
    assert kernel.compile_results[0].config.found_by_coordesc is True  # run() will not tune it again
    assert kernel.autotune_cache_info["autotune_cache_state"] == "hit"


@pytest.mark.parametrize("recheck", _implementations())
def test_a_single_config_kernel_takes_the_cached_coordesc_mark(tmp_path: Path, recheck) -> None:  # noqa: ANN001
    """The unfixed method skipped kernels with one config entirely (``len(configs) > 1``)."""
    configs = [triton.Config({"XBLOCK": 128}, num_warps=8)]
    kernel = _kernel(tmp_path, configs)
    _save_best(kernel, configs, configs[0], found_by_coordesc=True)
    recheck(kernel, reload_kernel_from_src=None)
    assert kernel.compile_results[0].config.found_by_coordesc is True


@pytest.mark.parametrize("recheck", _implementations())
def test_without_a_cached_winner_nothing_changes(tmp_path: Path, recheck) -> None:  # noqa: ANN001
    configs = [triton.Config({"XBLOCK": 32}, num_warps=4), triton.Config({"XBLOCK": 64}, num_warps=4)]
    kernel = _kernel(tmp_path, configs)
    before = list(kernel.compile_results)
    recheck(kernel, reload_kernel_from_src=None)
    assert kernel.compile_results == before
    assert not any(getattr(r.config, "found_by_coordesc", False) for r in before)


@pytest.mark.parametrize("recheck", _implementations())
def test_a_winner_nobody_compiled_is_compiled_once(tmp_path: Path, recheck) -> None:  # noqa: ANN001
    configs = [triton.Config({"XBLOCK": 32}, num_warps=4), triton.Config({"XBLOCK": 64}, num_warps=4)]
    kernel = _kernel(tmp_path, configs)
    _save_best(kernel, configs, triton.Config({"XBLOCK": 256}, num_warps=2), found_by_coordesc=True)
    compiled: list = []
    kernel.fn = types.SimpleNamespace(fn=object())  # the kernel source is loaded: no reload needed
    kernel._precompile_config = lambda config: compiled.append(config) or types.SimpleNamespace(config=config)
    recheck(kernel, reload_kernel_from_src=None)
    assert [c.kwargs for c in compiled] == [{"XBLOCK": 256}]
    assert kernel.compile_results[0].config.found_by_coordesc is True


def test_the_fix_is_applied_only_where_it_is_missing() -> None:
    installed = th.CachingAutotuner.recheck_autotune_cache
    if torch_backports._FIX_MARKER in _source(installed):
        assert not torch_backports.needs_coordesc_fix(installed)  # torch >= 2.13 has it

    def unfixed(self, reload_kernel_from_src):  # noqa: ANN001, ANN202 - the shape of torch 2.11's method
        configs = [result.config for result in self.compile_results]
        if len(configs) > 1:
            self.compile_results = self.compile_results[:1]

    assert torch_backports.needs_coordesc_fix(unfixed)
    assert not torch_backports.needs_coordesc_fix(torch_backports.recheck_autotune_cache)
    assert not torch_backports.needs_coordesc_fix(None)  # older torch: no static reload, no bug


def test_install_leaves_a_fixed_torch_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    original = th.CachingAutotuner.recheck_autotune_cache
    monkeypatch.setattr(torch_backports, "_installed", [])
    applied = torch_backports.install()
    try:
        if torch_backports.needs_coordesc_fix(original):
            assert applied == ["pytorch#172819"]
            assert th.CachingAutotuner.recheck_autotune_cache is torch_backports.recheck_autotune_cache
        else:
            assert applied == [] and th.CachingAutotuner.recheck_autotune_cache is original
    finally:
        th.CachingAutotuner.recheck_autotune_cache = original


def _source(method) -> str:  # noqa: ANN001
    import inspect

    return inspect.getsource(method)
