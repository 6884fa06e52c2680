"""The real H200 caches in tests/fixtures (copied from the team's shared fixtures, 1.7 MB): bundled with the CLI, unpacked at another path,
and found by Triton's own cache manager, as a user's CI prebake and a training node would.

The fixtures are data: nothing from them is imported or unpickled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def real_triton_cache(tmp_path_factory) -> Path:
    archive = FIXTURES / "triton_autotune_caches.tar.gz"
    assert archive.exists(), f"{archive} is missing from the checkout"
    root = tmp_path_factory.mktemp("fixture")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root / "tri_results" / "triton_cache_dir"


def cli(*args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "bundler.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


FIND_GROUPS = """
import json, os, sys
from triton.runtime.cache import FileCacheManager
found = missing = 0
for key in sorted(os.listdir(os.environ["TRITON_CACHE_DIR"])):
    manager = FileCacheManager(key)
    for name in os.listdir(manager.cache_dir):
        if name.startswith("__grp__"):
            group = manager.get_group(name[len("__grp__"):])
            ok = group is not None and len(group) == len(json.load(open(os.path.join(manager.cache_dir, name)))["child_paths"])
            found, missing = found + ok, missing + (not ok)
print(json.dumps({"found": found, "missing": missing}))
"""


def groups_found(cache_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", FIND_GROUPS], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRITON_CACHE_DIR": str(cache_dir)}, timeout=120).stdout
    return json.loads(out)


def test_real_triton_cache_unpacked_elsewhere_is_warm_for_triton(real_triton_cache, tmp_path):
    kernels = list(real_triton_cache.glob("*/__grp__*.json"))
    assert len(kernels) == 20  # 20 compiled configs; the other folders hold autotune.json results
    bundle = tmp_path / "cache.tar.zst"
    digest = cli("pack", str(real_triton_cache), "-o", str(bundle))
    assert cli("pack", str(real_triton_cache), "-o", str(tmp_path / "again.tar.zst")) == digest
    assert bundle.read_bytes() == (tmp_path / "again.tar.zst").read_bytes()

    elsewhere = tmp_path / "node" / "triton"
    cli("unpack", str(bundle), "--into", str(elsewhere), "--digest", digest)
    assert groups_found(elsewhere) == {"found": len(kernels), "missing": 0}

    raw = tmp_path / "raw" / "triton"
    cli("unpack", str(bundle), "--into", str(raw), "--raw")
    assert groups_found(raw) == {"found": 0, "missing": len(kernels)}  # what a plain copy gives
