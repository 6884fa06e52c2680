"""torch_gate under concurrency: every compile that starts while a fetch is pending waits for it.

A job can compile on several threads at once (two models, a serving pool). The gate must hold
each of them until the bundle is in place, not only the first one to arrive; and a fetch that runs
past its limit releases all of them with one warning.
"""

from __future__ import annotations

import threading
import time
import types

import pytest

pytest.importorskip("torch")

from bundler.integrations import torch_gate  # noqa: E402


def _compile_on_threads(call, names: tuple[str, ...]) -> tuple[list, list]:  # noqa: ANN001
    """Start a thread per name calling ``call(name, seen)``, which records into ``seen`` what its
    call found. The threads start 50 ms apart, the second while the first waits."""
    seen: list[tuple[str, bool]] = []
    threads = [threading.Thread(target=call, args=(name, seen)) for name in names]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    return seen, threads


def _recorder(ready: threading.Event):  # noqa: ANN202
    def compile_fx(name: str, seen: list) -> str:
        seen.append((name, ready.is_set()))
        return name

    return compile_fx


def test_a_second_thread_compiling_while_the_first_waits_waits_too() -> None:
    ready = threading.Event()
    torch_gate.hold_until(ready, 30, "the bundle")
    gated = torch_gate._gated(_recorder(ready))
    try:
        seen, threads = _compile_on_threads(gated, ("model_a", "model_b"))
        time.sleep(0.3)
        assert seen == [], f"a compile went ahead before the bundle was in place: {seen}"
        ready.set()
        for thread in threads:
            thread.join(30)
        assert sorted(seen) == [("model_a", True), ("model_b", True)]
        assert not torch_gate._pending  # in place: forgotten, later compiles are free
    finally:
        torch_gate.release(ready)


def test_a_late_fetch_releases_every_waiting_compile_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    ready = threading.Event()  # never set: the fetch outlives its limit
    torch_gate.hold_until(ready, 0.5, "the bundle")
    gated = torch_gate._gated(_recorder(ready))
    try:
        started = time.monotonic()
        seen, threads = _compile_on_threads(gated, ("model_a", "model_b"))
        for thread in threads:
            thread.join(30)
        assert sorted(seen) == [("model_a", False), ("model_b", False)]
        assert time.monotonic() - started < 5
        assert caplog.text.count("still not in place") == 1
        assert not torch_gate._pending
    finally:
        torch_gate.release(ready)


def test_a_second_header_build_waits_for_the_header_bundle_too() -> None:
    ready = threading.Event()
    codecache = types.SimpleNamespace(_HEADER_DIR="/headers")
    with torch_gate._lock:
        torch_gate._headers_pending.append(torch_gate._Hold(ready, 30, "the precompiled headers"))

    def write(name: str, seen: list, specified_dir: str = "") -> tuple[str, str]:
        seen.append((name, ready.is_set()))
        return name, f"{specified_dir}/{name}.h"

    gated = torch_gate._gated_header_write(write, codecache)
    try:
        seen, threads = _compile_on_threads(lambda name, seen: gated(name, seen, specified_dir="/headers"),
                                            ("h1", "h2"))
        time.sleep(0.3)
        assert seen == []
        ready.set()
        for thread in threads:
            thread.join(30)
        assert sorted(seen) == [("h1", True), ("h2", True)]
        assert {"/headers/h1.h", "/headers/h2.h"} <= set(torch_gate.header_writes())
    finally:
        torch_gate.release(ready)
