"""The remote commands as a user runs them: real processes against moto over HTTP on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bundles import snapshot, write_tree
from conftest import _boto_client

FILES = {f"kern{i}/k.cubin": os.urandom(20_000) for i in range(10)} | {"kern0/k.json": b"{}"}


def bundler(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bundler.cli", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )


@pytest.fixture
def src(tmp_path: Path) -> Path:
    write_tree(tmp_path / "src", FILES)
    return tmp_path / "src"


def test_push_pull_export_import_ls(s3_server, src, tmp_path):
    pushed = bundler("push", str(src), "--remote", s3_server, "--ref", "ci/main")
    assert pushed.returncode == 0, pushed.stderr
    digest = pushed.stdout.strip()
    assert len(digest) == 64 and pushed.stderr == ""

    pulled = bundler("pull", "--ref", "ci/main", "--into", str(tmp_path / "out"), env={"BUNDLER_REMOTE": s3_server})
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == digest and snapshot(tmp_path / "out") == snapshot(src)

    exported = bundler("export", digest, "--remote", s3_server, "-o", str(tmp_path / "off.tar.zst"))
    assert exported.returncode == 0, exported.stderr
    assert bundler("verify", str(tmp_path / "off.tar.zst"), "--digest", digest).returncode == 0

    mirror = (tmp_path / "mirror").as_uri()
    imported = bundler("import", str(tmp_path / "off.tar.zst"), "--remote", mirror, "--ref", "offline")
    assert imported.returncode == 0 and imported.stdout.strip() == digest, imported.stderr

    listing = json.loads(bundler("ls", "--remote", s3_server, "--json").stdout)
    assert [r["name"] for r in listing["refs"]] == ["ci/main"] and listing["refs"][0]["digest"] == digest
    assert [b["digest"] for b in listing["bundles"]] == [digest]
    text = bundler("ls", "--remote", mirror).stdout
    assert "offline" in text and digest in text


def test_misses_exit_3(s3_server, tmp_path):
    assert bundler("pull", "--ref", "nope", "--remote", s3_server, "--into", str(tmp_path / "d")).returncode == 3
    result = bundler("pull", "ab" * 32, "--remote", s3_server, "--into", str(tmp_path / "d"))
    assert result.returncode == 3 and "ab" * 32 in result.stderr
    assert bundler("export", "--ref", "nope", "--remote", s3_server, "-o", str(tmp_path / "x")).returncode == 3
    assert not (tmp_path / "x").exists()


def test_no_remote_configured_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BUNDLER_REMOTE", raising=False)
    result = bundler("ls")
    assert result.returncode == 2 and "BUNDLER_REMOTE" in result.stderr


def test_unreachable_store_exits_5_within_budget(aws_env, tmp_path, src):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"s3://bucket/p?endpoint=http://127.0.0.1:{silent.getsockname()[1]}&addressing=path"
        env = {"BUNDLER_CONNECT_TIMEOUT": "0.5", "BUNDLER_READ_TIMEOUT": "0.5", "BUNDLER_MAX_ATTEMPTS": "2"}
        start = time.monotonic()
        result = bundler("pull", "--ref", "x", "--remote", url, "--into", str(tmp_path / "d"), env=env, timeout=60)
        elapsed = time.monotonic() - start
    assert result.returncode == 5, result.stderr
    assert "127.0.0.1" in result.stderr and elapsed < 15
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    refused = f"s3://bucket/p?endpoint=http://127.0.0.1:{port}&addressing=path"
    assert bundler("push", str(src), "--remote", refused, env=env).returncode == 5


def test_eight_processes_pushing_the_same_bundle_make_one_object(s3_server, s3_bucket, moto_endpoint, src):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: bundler("push", str(src), "--remote", s3_server, "--ref", "same"), range(8)))
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    assert len({r.stdout for r in results}) == 1
    objects = _boto_client(moto_endpoint).list_objects_v2(Bucket=s3_bucket, Prefix="some/prefix/v1/bundles/")
    assert objects["KeyCount"] == 1


def test_bad_profile_and_bad_endpoint_are_one_line_usage_errors(aws_env, tmp_path):
    result = bundler("ls", "--remote", "s3://bucket/p", env={"AWS_PROFILE": "no-such-profile"})
    assert result.returncode == 2 and "AWS_PROFILE" in result.stderr and "Traceback" not in result.stderr
    result = bundler("ls", "--remote", "s3://bucket/p?endpoint=notaurl")
    assert result.returncode == 2 and "notaurl" in result.stderr and "Traceback" not in result.stderr


def test_refs_explain_themselves_in_ls_and_show(s3_server, src):
    assert bundler("push", str(src), "--remote", s3_server, "--ref", "team/model").returncode == 0
    listing = json.loads(bundler("ls", "--remote", s3_server, "--json").stdout)["refs"][0]
    assert listing["name"] == "team/model" and listing["entries"] == len(FILES)
    assert listing["host"] == socket.gethostname() and "push" in listing["command"]
    assert listing["extra"]["bytes"] == sum(len(v) for v in FILES.values())
    assert f"by {socket.gethostname()}" in bundler("ls", "--remote", s3_server).stdout
    shown = bundler("show", "team/model", "--remote", s3_server, "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["digest"] == listing["digest"] and doc["producer"]["bundler"] and doc["extra"]["pushed_at"]
    text = bundler("show", "team/model", "--remote", s3_server).stdout
    assert "extra.host:" in text and "producer.python:" in text


def test_not_found_names_the_next_command(s3_server, tmp_path):
    for args in (("show", "nope"), ("pull", "--ref", "nope", "--into", str(tmp_path / "d")), ("rm", "nope")):
        result = bundler(*args, "--remote", s3_server)
        assert result.returncode == 3 and "bundler ls" in result.stderr, (args, result.stderr)


def test_warm_pushes_nothing_when_the_command_fails_and_returns_its_code(s3_server, tmp_path):
    env = {"BUNDLER_CACHE_DIR": str(tmp_path / "b"), "TRITON_CACHE_DIR": str(tmp_path / "t")}
    script = ("import os, pathlib; assert os.environ['BUNDLER_REF'] == 'w' and os.environ['BUNDLER_WARM'] == '1'; "
              "p = pathlib.Path(os.environ['BUNDLER_CACHE_DIR'], 'autotune'); p.mkdir(parents=True, exist_ok=True); "
              "(p / 'k.json').write_text('{\"time_taken_ns\": 2000000000}'); raise SystemExit(int(os.environ['CODE']))")
    failed = bundler("warm", "--ref", "w", "--remote", s3_server, "--", sys.executable, "-c", script,
                     env={**env, "CODE": "7"})
    assert failed.returncode == 7 and "nothing pushed" in failed.stderr
    assert json.loads(bundler("ls", "--remote", s3_server, "--json").stdout)["refs"] == []
    ok = bundler("warm", "--ref", "w", "--remote", s3_server, "--json", "--", sys.executable, "-c", script,
                 env={**env, "CODE": "0"})
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["pushed"]
    shown = json.loads(bundler("show", "w", "--remote", s3_server, "--json").stdout)
    assert shown["extra"]["warm"] is True and shown["tuning_s"] == 2.0 and shown["entries"] == 1


def test_a_ref_whose_bundle_is_gone_says_so(s3_server, s3_bucket, moto_endpoint, src, tmp_path):
    """The ref is what the user named: the message names it and its missing bundle, and what to do."""
    digest = bundler("push", str(src), "--remote", s3_server, "--ref", "a/one").stdout.strip()
    _boto_client(moto_endpoint).delete_object(Bucket=s3_bucket, Key=f"some/prefix/v1/bundles/{digest}.tar.zst")
    for args in (("pull", "--ref", "a/one", "--into", str(tmp_path / "d")),
                 ("export", "--ref", "a/one", "-o", str(tmp_path / "x.tar.zst"))):
        result = bundler(*args, "--remote", s3_server)
        assert result.returncode == 3, result.stderr
        assert f"ref a/one points at bundle {digest}, which is not in the store" in result.stderr, result.stderr
        assert "push the ref again" in result.stderr
    assert not (tmp_path / "x.tar.zst").exists() and not (tmp_path / "d").exists()


def test_export_keeps_an_existing_file_unless_force(s3_server, src, tmp_path):
    digest = bundler("push", str(src), "--remote", s3_server, "--ref", "ci/main").stdout.strip()
    precious = tmp_path / "precious.txt"
    precious.write_text("important\n")
    result = bundler("export", "--ref", "ci/main", "--remote", s3_server, "-o", str(precious))
    assert result.returncode == 2 and str(precious) in result.stderr and "--force" in result.stderr
    assert precious.read_text() == "important\n"
    forced = bundler("export", "--ref", "ci/main", "--remote", s3_server, "-o", str(precious), "--force")
    assert forced.returncode == 0 and forced.stdout.strip() == digest
    assert bundler("verify", str(precious), "--digest", digest).returncode == 0
