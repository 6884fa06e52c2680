"""Reads through the store helper process (``bundler.stores.proxy``), over moto's HTTP server.

What users rely on: the same bytes and the same errors as the store itself, botocore never loaded
in the reading process, and a helper that cannot start or dies costing nothing but a fallback to
reading in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundler.config import Settings
from bundler.errors import ConfigError, NotFoundError, StoreError
from bundler.stores import open_store
from bundler.stores.proxy import ProxyStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def filled(s3_server: str) -> str:
    store = open_store(s3_server)
    store.write_bytes("refs/a", b'{"digest": "x"}')
    store.write_bytes("bundles/big", bytes(range(256)) * (12 << 10))  # 3 MiB: several data frames
    return s3_server


def test_reads_give_the_stores_bytes_listing_and_errors(filled: str) -> None:
    store = open_store(filled)
    with ProxyStore(Settings(remote=filled)) as proxy:
        assert proxy.read_bytes("refs/a") == store.read_bytes("refs/a")
        with proxy.open_read("bundles/big") as stream:
            assert stream.read(10) + stream.read() == store.read_bytes("bundles/big", limit=1 << 30)
        assert proxy.head("refs/a") == store.head("refs/a")
        assert proxy.head("refs/none") is None
        assert [i.key for i in proxy.list("")] == [i.key for i in store.list("")] == ["bundles/big", "refs/a"]
        with pytest.raises(NotFoundError, match="refs/none"):
            proxy.read_bytes("refs/none")
        assert proxy._child is not None  # all of it through the helper, which is still up
        with pytest.raises(StoreError, match="only reads"):
            proxy.write_bytes("refs/b", b"")


def test_the_reading_process_never_loads_botocore(filled: str) -> None:
    script = (
        "import sys\n"
        "from bundler.config import Settings\n"
        "from bundler.stores.proxy import ProxyStore\n"
        f"proxy = ProxyStore(Settings(remote={filled!r}))\n"
        "data = proxy.read_bytes('refs/a')\n"
        "print(data.decode(), 'botocore' in sys.modules, proxy._child is not None)\n"
        "proxy.close()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert done.stdout.split() == ['{"digest":', '"x"}', "False", "True"]


def test_a_helper_that_dies_mid_object_fails_that_read_then_reads_fall_back(filled: str) -> None:
    with ProxyStore(Settings(remote=filled)) as proxy:
        with proxy.open_read("bundles/big") as stream:
            stream.read(1)
            proxy._child.kill()  # type: ignore[union-attr]
            with pytest.raises(StoreError, match="stopped"):
                stream.read()
        assert proxy.read_bytes("refs/a") == b'{"digest": "x"}'  # in this process now
        assert proxy._child is None


def test_a_helper_gone_between_reads_costs_nothing(filled: str) -> None:
    with ProxyStore(Settings(remote=filled)) as proxy:
        assert proxy.head("refs/a") is not None
        proxy._child.kill()  # type: ignore[union-attr]
        proxy._child.wait()  # type: ignore[union-attr]
        assert proxy.read_bytes("refs/a") == b'{"digest": "x"}'  # no error: nothing was read yet
        assert [i.key for i in proxy.list("refs/")] == ["refs/a"]


def test_a_helper_that_cannot_start_reads_in_process(filled: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    proxy = ProxyStore(Settings(remote=filled))
    assert proxy._child is None
    assert proxy.read_bytes("refs/a") == b'{"digest": "x"}'
    proxy.close()


def test_a_store_the_helper_cannot_open_fails_as_it_would_here(s3_bucket: str, moto_endpoint: str) -> None:
    url = f"s3://{s3_bucket}/p?endpoint=not-a-url&addressing=path"
    with ProxyStore(Settings(remote=url)) as proxy, pytest.raises(ConfigError, match="not-a-url"):
        proxy.read_bytes("refs/a")


def test_a_banner_printed_by_the_helpers_interpreter_does_not_break_it(
    filled: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clusters and conda envs print from ``sitecustomize`` or ``.pth`` files at every start; on
    the frames' pipe that text would read as a 1.7 GB frame, and every read would hang."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nprint('Hello from site')\nos.write(1, b'raw banner\\n')\n")
    monkeypatch.syspath_prepend(str(site))
    with ProxyStore(Settings(remote=filled)) as proxy:
        assert proxy.read_bytes("refs/a") == b'{"digest": "x"}'
        assert proxy._child is not None  # through the helper, not the in-process fallback


def test_a_helper_that_sends_garbage_is_dropped_and_reads_fall_back(filled: str) -> None:
    with ProxyStore(Settings(remote=filled)) as proxy:
        assert proxy.head("refs/a") is not None
        fds = list(proxy._fds)
        child = proxy._child
        assert child is not None
        with open(f"/proc/{child.pid}/fd/{child.args[-1]}", "wb") as frames:  # the child's end
            frames.write(b"Hello")  # what a stray print in the helper would put there
        assert proxy.read_bytes("refs/a") == b'{"digest": "x"}'
        assert proxy._child is None and fds != proxy._fds


def test_a_helper_gone_before_its_settings_arrive_never_raises(
    filled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that exits before the first request makes that write fail (EPIPE): the job's
    session must not see it, it reads in this process instead."""
    from bundler.stores import proxy as proxy_module

    def broken_pipe(self: ProxyStore, message: dict) -> None:
        self._stop()
        raise proxy_module._gone(self.url, BrokenPipeError(32, "Broken pipe"))

    monkeypatch.setattr(ProxyStore, "_send", broken_pipe)
    proxy = ProxyStore(Settings(remote=filled))
    monkeypatch.undo()
    assert proxy._child is None
    assert proxy.read_bytes("refs/a") == b'{"digest": "x"}'
    proxy.close()


def test_a_forked_worker_does_not_keep_the_helper_alive(filled: str) -> None:
    """DataLoader workers fork from the job: they must not hold the helper's stdin open, or a
    helper of a killed job lives on until the last worker exits."""
    proxy = ProxyStore(Settings(remote=filled))
    helper = proxy._child
    assert proxy.head("refs/a") is not None and helper is not None
    pid = os.fork()
    if pid == 0:  # the worker: outlives the job by far
        import time

        time.sleep(30)
        os._exit(0)
    try:
        proxy._close_fds()  # the job is gone: its descriptors close, nothing kills the helper
        helper.wait(timeout=10)  # the helper saw its stdin end
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        proxy.close()
