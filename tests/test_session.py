"""Compile sessions: miss -> push, hit -> unpack and push nothing, and the failure policy."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import bundler
from bundler import keys, recording
from bundler import session as session_mod
from bundler.config import Settings
from bundler.errors import StoreUnreachableError
from bundler.remote import health as shared
from bundler.remote import layout
from bundler.stores import open_store
from bundler.stores.base import Store

from _helpers_triton import GROUP_KEY, autotune_record, fake_gpu_driver, fake_kernel, node_settings

CODE = "def model(x):  # built 2026-01-01 on ci-7\n    return x\n"


@pytest.fixture(autouse=True)
def fresh_breakers() -> Any:
    """Sessions trip the process-wide breakers of their remote: no test may see another's."""
    shared.reset()
    yield
    shared.reset()


@pytest.fixture(params=["local", "s3_server"])
def remote(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue({"local": "local_store_url"}.get(request.param, request.param))


def produce(base: Path, remote: str | None, node: str = "a") -> session_mod.CompileSession:
    """A cold node: compile (fake files), record them with put(), push at the end."""
    settings = node_settings(base, node, remote)
    with bundler.compile_session(code=CODE, settings=settings) as s:
        assert s.sync() is False
        for path in fake_kernel(settings).values():
            bundler.put(path)
        bundler.put(autotune_record(settings, "k1", 2_000_000_000))
    return s


def test_miss_pushes_a_bundle_and_a_fresh_node_gets_everything_back(tmp_path: Path, remote: str) -> None:
    cold = produce(tmp_path, remote)
    assert cold.pushed is not None and len(cold.pushed.manifest.files) == 4
    assert open_store(remote).exists(layout.ref_key(cold.ref_name))

    warm = node_settings(tmp_path, "b", remote)
    with bundler.compile_session(code=CODE.replace("ci-7", "ci-8"), settings=warm) as s:
        assert s.sync() is True
        assert s.time_saved_ns == 2_000_000_000
    assert s.pushed is None  # a hit uploads nothing
    group = json.loads((warm.triton_cache_dir / GROUP_KEY / "__grp__add.json").read_text())
    assert group["child_paths"]["add.cubin"] == str(warm.triton_cache_dir / GROUP_KEY / "add.cubin")
    assert (warm.cache_dir / "autotune" / "k1.json").is_file()


def test_bundled_group_files_hold_no_absolute_paths(tmp_path: Path, local_store_url: str) -> None:
    from bundler.bundle import archive

    pushed = produce(tmp_path, local_store_url).pushed
    with open_store(local_store_url).open_read(layout.bundle_key(pushed.digest)) as stream:
        files = dict((rec.path, data) for rec, data in archive.iter_files(stream))
    group = json.loads(files[f"triton/{GROUP_KEY}/__grp__add.json"])
    assert group["child_paths"] == {"add.cubin": "add.cubin", "add.json": "add.json"}


def test_same_files_from_another_path_give_the_same_bundle(tmp_path: Path, local_store_url: str) -> None:
    first = produce(tmp_path, local_store_url, node="a").pushed
    (tmp_path / "store").rename(tmp_path / "old-store")
    second = produce(tmp_path, (tmp_path / "store").as_uri(), node="elsewhere/deeper").pushed
    assert first.digest == second.digest


def test_sessions_off_without_bundles_or_remote(tmp_path: Path) -> None:
    for settings in (node_settings(tmp_path, "a", None), node_settings(tmp_path, "b", "file:///x", bundles=False)):
        with bundler.compile_session(code=CODE, settings=settings) as s:
            bundler.put(fake_kernel(settings)["group"])
        assert not s.enabled and s.key is None and s.pushed is None


class _Store(Store):
    """A store that stalls, then fails, on every call; counts the calls."""

    url = "s3://bucket/p"

    def __init__(self, delay: float = 0.0, error: Exception | None = None) -> None:
        self.delay, self.error, self.calls = delay, error or StoreUnreachableError("down"), 0

    def _fail(self, *args: object, **kwargs: object) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        raise self.error

    open_read = write = head = list = delete = _fail


def test_unreachable_store_is_a_warning_and_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = node_settings(tmp_path, "a", "s3://bucket/p")
    store = _Store(error=StoreUnreachableError("connection refused"))
    with caplog.at_level(logging.WARNING), session_mod.CompileSession(code=CODE, settings=settings, store=store) as s:
        assert s.sync() is False
        s.put(fake_kernel(settings)["add.cubin"])
    assert store.calls == 1 and s.pushed is None  # the failed fetch stops the push too: no second timeout
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "reads and writes skipped" in warnings[0] and len(warnings[0]) < 200


def test_a_dead_store_trips_the_shared_breakers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A failed fetch turns the remote off for reads and writes, sessions and records: one warning."""
    from bundler.autotune import AutotuneCache

    settings = node_settings(tmp_path, "a", "s3://bucket/p")
    store = _Store(error=StoreUnreachableError("connection refused"))
    monkeypatch.setattr(shared, "shared_store", lambda _settings: store)
    with caplog.at_level(logging.WARNING):
        with session_mod.CompileSession(code=CODE, settings=settings, store=store) as s:
            assert s.sync() is False
            s.put(fake_kernel(settings)["add.cubin"])
        assert store.calls == 1
        assert not shared.remote_usable(settings, "read") and not shared.remote_usable(settings, "write")
        AutotuneCache("k" * 64, "h", settings.replace(local_cache=False, bundles=False)).read_best([])  # skips the dead store
        with session_mod.CompileSession(code=CODE, settings=settings, store=store) as again:
            assert again.sync() is False
            again.put(fake_kernel(settings)["add.cubin"])
    assert store.calls == 1 and again.pushed is None
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1, caplog.text


def test_slow_store_costs_at_most_the_pull_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Its own remote: the abandoned fetch trips that remote's read breaker after this test ends.
    settings = node_settings(tmp_path, "a", f"s3://bucket/{tmp_path.name}").replace(pull_budget=0.2)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        s = session_mod.CompileSession(code=CODE, settings=settings, store=_Store(delay=2.0)).begin()
        assert s.sync() is False
    assert time.monotonic() - started < 1.5
    assert "pull budget" in caplog.text
    s._state = "ended"
    bundler.sync()  # no longer waits on the abandoned fetch


def test_corrupt_bundle_is_a_miss_and_the_next_push_repairs_it(
    tmp_path: Path, local_store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    pushed = produce(tmp_path, local_store_url).pushed
    open_store(local_store_url).write_bytes(layout.bundle_key(pushed.digest), b"garbage" * 100)
    settings = node_settings(tmp_path, "b", local_store_url)
    with caplog.at_level(logging.WARNING), bundler.compile_session(code=CODE, settings=settings) as s:
        assert s.sync() is False
        for path in fake_kernel(settings).values():  # the node compiles what the bundle would have held
            s.put(path)
        s.put(autotune_record(settings, "k1", 2_000_000_000))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and "unusable" in warnings[0]  # the reader says so once, in one line,
    assert "damaged" in warnings[1] and "replacing" in warnings[1]  # and the writer says it repaired it
    assert s.pushed is not None and s.pushed.digest == pushed.digest and s.pushed.uploaded  # replaced
    healed = node_settings(tmp_path, "c", local_store_url)
    with bundler.compile_session(code=CODE, settings=healed) as again:
        assert again.sync() is True


def test_failed_compile_pushes_nothing(tmp_path: Path, local_store_url: str) -> None:
    settings = node_settings(tmp_path, "a", local_store_url)
    with pytest.raises(RuntimeError), bundler.compile_session(code=CODE, settings=settings) as s:
        bundler.put(fake_kernel(settings)["add.cubin"])
        raise RuntimeError("compile failed")
    assert s.pushed is None and not list(open_store(local_store_url).list())


def test_ending_a_session_twice_is_harmless(tmp_path: Path, local_store_url: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    settings = node_settings(tmp_path, "a", local_store_url)
    with caplog.at_level(logging.DEBUG, logger="bundler.session"):
        with bundler.compile_session(code=CODE, settings=settings) as s:
            s.put(fake_kernel(settings)["add.cubin"])
            pushed = bundler.end_compile()  # ended inside the block: __exit__ must not raise
        assert pushed is not None and s.pushed is pushed
        assert s.end() is None
        assert session_mod.CompileSession(code=CODE, settings=settings).end() is None  # never begun
    assert "not open" in caplog.text
    assert session_mod.current() is None


def test_a_pulled_file_removed_before_it_is_recorded_still_counts_as_a_hit(
        tmp_path: Path, local_store_url: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    produce(tmp_path, local_store_url)
    warm = node_settings(tmp_path, "b", local_store_url)
    real = recording.source_for

    def cleaned_meanwhile(name: str, path: Any) -> recording.Source:
        if name.endswith("__grp__add.json"):
            raise FileNotFoundError(2, "No such file or directory", str(path))  # a concurrent cache clean
        return real(name, path)

    crashed: list[Any] = []
    monkeypatch.setattr(recording, "source_for", cleaned_meanwhile)
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    with caplog.at_level(logging.WARNING), bundler.compile_session(code=CODE, settings=warm) as s:
        assert s.sync() is True
    assert not crashed and s.pushed is None  # a hit: nothing pushed again
    assert s.time_saved_ns == 2_000_000_000
    assert "vanished" in caplog.text


def test_key_derivation_that_reads_the_cache_does_not_wait_for_its_own_fetch(
        tmp_path: Path, local_store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's driver, started by backend_hash on the fetch thread, reads its helper via the cache manager.

    That read calls recording.wait_for_pending(), which must not make the fetch thread join itself
    (RuntimeError, caught by backend_hash, so a GPU job got the interpreter's key for the process).
    """
    from types import SimpleNamespace

    begun = threading.Event()
    asked_from: list[str] = []

    def driver_target() -> Any:
        begun.wait(5)  # the session is registered as a pending fetch by now, as with a real driver start
        recording.wait_for_pending()  # what get_cache_manager(...).get_file(...) does in our manager
        asked_from.append(threading.current_thread().name)
        return SimpleNamespace(backend="cuda", arch=90, warp_size=32)

    fake_gpu_driver(monkeypatch, driver_target)
    try:
        settings = node_settings(tmp_path, "a", local_store_url)
        started = time.monotonic()
        s = session_mod.CompileSession(code=CODE, settings=settings).begin()
        begun.set()
        assert s.sync() is False  # nothing pushed yet: a miss, not a hang
        assert time.monotonic() - started < 5
        gpu = keys.version_salt(settings.tag, backend="cuda-90-32-ptxas-12.8")
        assert s.key == keys.compile_key(code=CODE, salt=gpu)
        assert asked_from == ["bundler-fetch"]
        s.end()
    finally:
        keys.backend_hash.cache_clear()


def test_module_level_begin_put_end(tmp_path: Path, local_store_url: str) -> None:
    settings = node_settings(tmp_path, "a", local_store_url)
    s = bundler.begin_compile(code_hash="0" * 64, settings=settings)
    assert session_mod.current() is s
    s.put(fake_kernel(settings)["add.cubin"])
    s.put(tmp_path / "elsewhere.txt", b"x")  # outside the caches: warned about, not bundled
    result = bundler.end_compile()
    assert [f.path for f in result.manifest.files] == [f"triton/{GROUP_KEY}/add.cubin"]
    assert bundler.end_compile() is None
    with pytest.raises(TypeError):
        bundler.begin_compile(code="a", code_hash="b", settings=settings)


# --- failure policy, key derivation off the caller's thread, fork safety -------------------------


def test_invalid_environment_disables_the_session_instead_of_raising(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BUNDLER_MAX_ATTEMPTS", "99")
    with caplog.at_level(logging.WARNING):
        s = bundler.begin_compile(code=CODE)
        bundler.put(tmp_path / "some-file")
        assert bundler.end_compile() is None
    assert not s.enabled and "BUNDLER_MAX_ATTEMPTS" in caplog.text


def test_local_cache_off_alone_turns_bundles_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BUNDLER_BUNDLES", "BUNDLER_LOCAL_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BUNDLER_LOCAL_CACHE", "0")
    settings = Settings.from_env()
    assert settings.local_cache is False and settings.bundles is False
    assert Settings.from_env({"BUNDLER_LOCAL_CACHE": "0"}, bundles=False).bundles is False
    assert not session_mod.CompileSession(code=CODE).enabled


def test_put_of_a_file_that_vanished_is_a_warning(tmp_path: Path, local_store_url: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    settings = node_settings(tmp_path, "a", local_store_url)
    group = fake_kernel(settings)["group"]
    group.unlink()
    with caplog.at_level(logging.WARNING), bundler.compile_session(code=CODE, settings=settings) as s:
        bundler.put(group)
        s.put(group)
    assert caplog.text.count("cannot read it") == 2 and s.pushed is None


def test_settings_with_string_paths_work_end_to_end(tmp_path: Path, local_store_url: str) -> None:
    produce(tmp_path, local_store_url)
    warm = Settings(cache_dir=str(tmp_path / "b" / "bundler"), triton_cache_dir=str(tmp_path / "b" / "triton"),
                    remote=local_store_url, pull_budget=10.0)
    assert isinstance(warm.cache_dir, Path) and isinstance(warm.triton_cache_dir, Path)
    with bundler.compile_session(code=CODE, settings=warm) as s:
        assert s.sync() is True


_BEGIN_IN_A_FRESH_PROCESS = """
import sys, threading, time
importers = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "triton":
            importers.append(threading.current_thread().name)
        return None

sys.meta_path.insert(0, Spy())
import bundler
from bundler.config import Settings
settings = Settings(cache_dir=sys.argv[1] + "/c", triton_cache_dir=sys.argv[1] + "/t", remote=sys.argv[2])
started = time.monotonic()
session = bundler.begin_compile(code="def f(): pass", settings=settings)
took = time.monotonic() - started
assert "MainThread" not in importers, importers
session.sync()
assert session.ref_name.startswith("compile-") and importers == ["bundler-fetch"], importers
bundler.end_compile()
print(took)
"""


def test_begin_compile_returns_without_importing_triton_on_the_callers_thread(
        tmp_path: Path, local_store_url: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _BEGIN_IN_A_FRESH_PROCESS, str(tmp_path), local_store_url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip()) < 0.5  # the Triton import alone takes about a second


def test_session_key_is_there_for_ref_name_and_push(tmp_path: Path, local_store_url: str) -> None:
    settings = node_settings(tmp_path, "a", local_store_url)
    s = session_mod.CompileSession(code=CODE, settings=settings).begin()
    assert s.ref_name == f"compile-{keys.compile_key(code=CODE, tag=settings.tag)}"
    s.put(fake_kernel(settings)["add.cubin"])
    assert s.end() is not None


def test_forked_child_does_not_deadlock_on_locks_held_at_the_fork() -> None:
    """A DataLoader worker forked while the fetch thread records must not hang on those locks."""
    from bundler import autotune, recording

    recorder = recording.Recorder()
    recording.attach(recorder)
    held = [recording._active_lock, recording._process._lock, recorder._lock,
            session_mod._sessions_lock, autotune._stats_lock]
    release = threading.Event()

    def hold_all() -> None:
        with contextlib.ExitStack() as stack:
            for lock in held:
                stack.enter_context(lock)
            holding.set()
            release.wait(10)

    holding = threading.Event()
    thread = threading.Thread(target=hold_all)
    thread.start()
    holding.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: every one of these would block forever on an inherited lock
            signal.alarm(10)
            recording.record("autotune/x.json", b"{}")
            session_mod.current()
            autotune.stats()
            os._exit(0)
    finally:
        release.set()
        thread.join()
        recording.detach(recorder)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


_LAYERS = """
import sys
import bundler
from bundler import artifacts, recording, session
from bundler.config import Settings
settings = Settings(cache_dir=sys.argv[1] + "/c", triton_cache_dir=sys.argv[1] + "/t", remote=sys.argv[2])
with bundler.compile_session(code_hash="0" * 64, settings=settings):
    pass
upward = sorted(m for m in sys.modules if m.startswith(("bundler.integrations", "bundler.autotune")))
assert not upward, upward
"""


def test_sessions_artifacts_and_recording_import_nothing_above_them(tmp_path: Path, local_store_url: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _LAYERS, str(tmp_path), local_store_url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_hit_records_its_files_for_its_own_session_only(tmp_path: Path, local_store_url: str) -> None:
    """Two sessions open in one process (two models, a threaded server): A's pulled files must not
    go into B, or B (a miss) pushes a bundle holding A's kernels under its own key."""
    a_producer = node_settings(tmp_path, "a", local_store_url)
    with bundler.compile_session(code="A = 1\n", settings=a_producer):
        for path in fake_kernel(a_producer, "akern").values():
            bundler.put(path)
    node = node_settings(tmp_path, "b", local_store_url)
    a = session_mod.CompileSession(code="A = 1\n", settings=node).begin()
    b = session_mod.CompileSession(code="B = 2\n", settings=node).begin()
    assert a.sync() and not b.sync()
    for path in fake_kernel(node, "bkern").values():
        b.put(path)
    a.end()
    pushed = b.end()
    assert pushed is not None
    assert sorted(r.path for r in pushed.manifest.files) == [
        f"triton/{GROUP_KEY}/__grp__bkern.json", f"triton/{GROUP_KEY}/bkern.cubin", f"triton/{GROUP_KEY}/bkern.json"
    ]
    assert a.pushed is None  # and A, a hit with nothing new, pushes nothing


def test_end_compile_ends_the_session_this_thread_began(tmp_path: Path, local_store_url: str) -> None:
    """One thread's end_compile() must not end another thread's session (pushing it early and
    leaving its own open and recording)."""
    settings = node_settings(tmp_path, "c", local_store_url)
    began, release, ended = threading.Event(), threading.Event(), {}

    def worker() -> None:
        ended["mine"] = bundler.begin_compile(code="T1 = 1\n", settings=settings)
        began.set()
        release.wait(10)
        bundler.end_compile()

    thread = threading.Thread(target=worker)
    thread.start()
    assert began.wait(10)
    main = bundler.begin_compile(code="T2 = 1\n", settings=settings)
    try:
        release.set()
        thread.join(10)
        assert ended["mine"]._state == "ended" and main._state == "open"
        assert session_mod.current() is main
    finally:
        bundler.end_compile()
    assert main._state == "ended"
