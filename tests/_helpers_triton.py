"""Shared helpers for the session, artifacts and Triton tests: settings and fake cache files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bundler.config import Settings

ROOT = Path(__file__).resolve().parent.parent
GROUP_KEY = "ABCDEFGHIJKLMNOP"


def node_settings(base: Path, node: str, remote: str | None, **changes: object) -> Settings:
    """Settings of one "node": its own local caches under ``base/node``, a shared remote."""
    return Settings(cache_dir=base / node / "bundler", triton_cache_dir=base / node / "triton", remote=remote,
                    pull_budget=10.0, **changes)  # type: ignore[arg-type]


def fake_kernel(settings: Settings, name: str = "add") -> dict[str, Path]:
    """A Triton-shaped kernel dir (binary + metadata + group file with absolute paths)."""
    directory = Path(settings.triton_cache_dir) / GROUP_KEY
    directory.mkdir(parents=True, exist_ok=True)
    children = {f"{name}.cubin": b"\x7fELF fake cubin", f"{name}.json": b'{"name": "%s"}' % name.encode()}
    paths = {}
    for child, data in children.items():
        (directory / child).write_bytes(data)
        paths[child] = directory / child
    group = directory / f"__grp__{name}.json"
    group.write_text(json.dumps({"child_paths": {c: str(p) for c, p in paths.items()}}))
    return {"group": group, **paths}


def autotune_record(settings: Settings, key: str, time_taken_ns: int) -> Path:
    path = Path(settings.cache_dir) / "autotune" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"time_taken_ns": time_taken_ns}))
    return path


def run_job(settings: Settings, *args: str) -> dict:
    """Run tests/scripts/autotune_job.py in a fresh process with ``settings`` in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUNDLER_", "TRITON_"))}
    env.update({
        "BUNDLER_CACHE_DIR": str(settings.cache_dir),
        "TRITON_CACHE_DIR": str(settings.triton_cache_dir),
        "BUNDLER_TAG": settings.tag,
        "BUNDLER_LOCAL_CACHE": str(int(settings.local_cache)),
        "BUNDLER_REMOTE_AUTOTUNE": str(int(settings.remote_autotune)),
        "BUNDLER_BUNDLES": str(int(settings.bundles)),
        "TRITON_DEFAULT_FP_FUSION": "1",
    })
    if settings.remote:
        env["BUNDLER_REMOTE"] = settings.remote
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "autotune_job.py"), *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


def fake_gpu_driver(monkeypatch, driver_target) -> None:  # noqa: ANN001 - pytest's MonkeyPatch, a callable
    """Make ``keys.backend_hash`` see a CUDA target through ``driver_target`` (no torch, no GPU).

    The backend hash is cached per process: it is cleared here, and the caller clears it again
    when done (``keys.backend_hash.cache_clear()`` in a ``finally``).
    """
    from types import SimpleNamespace

    from triton import knobs
    from triton.compiler import compiler

    from bundler import keys

    monkeypatch.setattr(knobs.runtime, "interpret", False)
    monkeypatch.setattr(keys, "_target_without_driver", lambda: None)
    monkeypatch.setattr(keys, "_driver_target", driver_target)
    monkeypatch.setattr(compiler, "make_backend", lambda target: SimpleNamespace(hash=lambda: "ptxas-12.8"))
    keys.backend_hash.cache_clear()
