"""One deadline per operation: a store that never answers, or trickles, cannot hold a job or a command.

Two hostile endpoints on loopback, both real TCP servers (botocore talks to them over HTTP):

* a *black hole* accepts connections and never answers a byte;
* a *trickler* answers every request with ``200 OK``, a large ``Content-Length`` and then one body
  byte every 0.2 s, so no socket read ever times out.

What a user relies on: a job with ``BUNDLER_PULL_BUDGET=5`` waits at most the budget plus one
connect timeout, prints one warning, and neither reads nor writes the store again; ``bundler pull
--timeout`` exits 5 in time with one line naming the store.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class _Server:
    """A loopback TCP server running ``handle(conn)`` per connection in a daemon thread."""

    def __init__(self, handle) -> None:  # noqa: ANN001
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._handle = handle
        self.connections = 0
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn, self._stop), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def _black_hole(conn: socket.socket, stop: threading.Event) -> None:
    stop.wait(120)
    conn.close()


def _trickle(conn: socket.socket, stop: threading.Event) -> None:
    conn.settimeout(5)
    try:
        conn.recv(65536)  # the request; its content does not matter
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\nETag: \"x\"\r\n"
                     b"Content-Type: application/octet-stream\r\n\r\n")
        while not stop.wait(0.2):
            conn.sendall(b"{")
    except OSError:
        pass
    finally:
        conn.close()


def _slow(conn: socket.socket, stop: threading.Event) -> None:
    """Steady but far too slow for its size (2 KiB/s of 10 MB): only a deadline stops this."""
    conn.settimeout(5)
    try:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\nETag: \"x\"\r\n"
                     b"Content-Type: application/octet-stream\r\n\r\n")
        while not stop.wait(0.5):
            conn.sendall(b"{" * 1024)
    except OSError:
        pass
    finally:
        conn.close()


_HANDLERS = {"black hole": _black_hole, "trickle": _trickle, "slow": _slow}


@pytest.fixture(params=["black hole", "trickle"])
def hostile_endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    server = _Server(_HANDLERS[request.param])
    yield server.url
    server.close()


@pytest.fixture(params=["black hole", "slow"])
def unfinishable_endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    """Endpoints no per-read rule ends in time: silence within botocore's retries, or a steady
    2 KiB/s that passes the too-slow check. Only the command's deadline stops these."""
    server = _Server(_HANDLERS[request.param])
    yield server.url
    server.close()


def _env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUNDLER_", "AWS_", "TRITON_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        BUNDLER_REMOTE=f"s3://bucket/p?endpoint={endpoint}&addressing=path",
        BUNDLER_CACHE_DIR=str(tmp_path / "cache"), TRITON_CACHE_DIR=str(tmp_path / "triton"),
        BUNDLER_CONNECT_TIMEOUT="1", BUNDLER_READ_TIMEOUT="2", BUNDLER_MAX_ATTEMPTS="3",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


_JOB = r"""
import json, logging, sys, time
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
import triton  # imported before the clock starts: the job's own start-up is not the store's fault
from bundler import keys
keys.version_salt("")  # the key's backend facts, likewise
import bundler
from bundler.autotune import AutotuneCache

class Config:
    def __init__(self, kwargs, num_warps=4):
        self.kwargs, self.num_warps = kwargs, num_warps

configs = [Config({"BLOCK": 64}), Config({"BLOCK": 128})]
started = time.monotonic()
with bundler.compile_session(code="def kernel(): pass") as session:
    hit = session.sync()
    for n in range(3):  # per-kernel lookups and saves, as an autotuner makes them
        cache = AutotuneCache.create({"kernel": f"k{n}"}, "kernels.py", "h")
        best = cache.read_best(configs)
        cache.save(configs[0], 1000)
waited = time.monotonic() - started
print(json.dumps({"waited": waited, "hit": hit, "pushed": session.pushed is not None}))
"""


@pytest.mark.slow
def test_a_job_waits_at_most_the_budget_and_warns_once(tmp_path: Path, hostile_endpoint: str) -> None:
    env = _env(tmp_path, hostile_endpoint, BUNDLER_PULL_BUDGET="5")
    done = subprocess.run([sys.executable, "-c", _JOB], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["hit"] is False and result["pushed"] is False
    assert result["waited"] <= 5 + 1 + 1.0, result  # budget + one connect timeout + scheduling slack
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr
    assert "reads and writes skipped" in warnings[0] and len(warnings[0]) < 200


@pytest.mark.slow
def test_pull_with_a_timeout_exits_5_in_time(tmp_path: Path, unfinishable_endpoint: str) -> None:
    hostile_endpoint = unfinishable_endpoint
    env = _env(tmp_path, hostile_endpoint)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bundler", "pull", "--ref", "llama/h100", "--into", str(tmp_path / "into"),
         "--timeout", "3"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    took = time.monotonic() - started
    assert done.returncode == 5, done.stderr
    assert took < 3 + 2 + 4, took  # the limit, the grace for cleanup, and interpreter start-up
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--timeout 3" in lines[0] and hostile_endpoint in lines[0]
    assert not (tmp_path / "into").exists()


def test_a_trickling_body_stops_at_the_deadline(tmp_path: Path, aws_env: None) -> None:
    """In-process: the stream's deadline check stops a read that no socket timeout would stop."""
    from bundler import deadline
    from bundler.config import Settings
    from bundler.errors import DeadlineExceededError
    from bundler.stores import open_store

    server = _Server(_trickle)
    try:
        settings = Settings(connect_timeout=1, read_timeout=2, max_attempts=1)
        store = open_store(f"s3://bucket/p?endpoint={server.url}&addressing=path", settings)
        started = time.monotonic()
        with deadline.scope(deadline.Deadline(1.5, "the test's budget")), pytest.raises(DeadlineExceededError):
            store.read_bytes("v1/refs/x.json")
        assert time.monotonic() - started < 1.5 + 1.0
    finally:
        server.close()


@pytest.mark.slow
def test_a_trickling_store_fails_a_pull_even_without_a_timeout(tmp_path: Path) -> None:
    """A body slower than 1 KiB per read-timeout window counts as broken: re-requested, then an
    error (exit 5), so no trickle keeps a command running however long its data would take."""
    server = _Server(_trickle)
    try:
        env = _env(tmp_path, server.url, BUNDLER_READ_TIMEOUT="1", BUNDLER_MAX_ATTEMPTS="2")
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "bundler", "pull", "--ref", "llama/h100", "--into", str(tmp_path / "into")],
            env=env, capture_output=True, text=True, timeout=120,
        )
        took = time.monotonic() - started
    finally:
        server.close()
    assert done.returncode == 5, done.stderr
    assert took < 20, took  # two 1 s windows plus retries' back-off and start-up, not minutes
    lines = done.stderr.strip().splitlines()
    assert "too slowly" in lines[-1] or "Range" in lines[-1]  # our fake server ignores Range on the re-request
    assert lines[-1].startswith("bundler: error:") and "v1/refs/llama/h100.json" in lines[-1]
