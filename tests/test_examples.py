"""Every example runs: the CI files' `bundler` commands, the torchrun start, the air-gap script.

Against moto over HTTP on 127.0.0.1, in real processes, with the Triton interpreter (CPU), and
``examples/demo_job.py --quick`` as the training script the examples name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
BIN = Path(sys.executable).parent


def shell_env(remote: str, tmp: Path, node: str, **extra: str) -> dict[str, str]:
    """The environment of a CI runner or a node: the venv on PATH (``bundler``, ``python``), fresh caches."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "BUNDLER_REMOTE": remote,
            "TRITON_INTERPRET": "1", "BUNDLER_CACHE_DIR": str(tmp / node / "bundler"),
            "TRITON_CACHE_DIR": str(tmp / node / "triton"), **extra}


def run_shell(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def workdir(tmp: Path) -> Path:
    """A checkout-like folder: the examples where the CI files expect them, nothing else."""
    work = tmp / "checkout"
    work.mkdir()
    (work / "examples").symlink_to(EXAMPLES)
    return work


def bundler_lines(path: Path) -> list[str]:
    """The `bundler ...` commands of a CI file, in order (YAML `run: |` blocks and `- ` script items)."""
    lines = []
    for raw in path.read_text().splitlines():
        text = re.sub(r"^\s*(-\s+|run:\s+)?", "", raw)
        if text.startswith("bundler "):
            lines.append(text)
    return lines


def job_report(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("name,variables", [
    ("github-actions.yml", {"GITHUB_REF_NAME": "main"}),
    ("gitlab-ci.yml", {"CI_COMMIT_REF_SLUG": "main"}),
])
def test_ci_workflow_commands_run(name, variables, s3_server, tmp_path):
    commands = bundler_lines(EXAMPLES / "ci" / name)
    assert any(c.startswith("bundler warm --ref") for c in commands), commands
    work = workdir(tmp_path)
    script = "\n".join(commands)
    first = run_shell(script, shell_env(s3_server, tmp_path, "runner-1", **variables), work)
    assert first.returncode == 0, first.stderr
    assert job_report(first.stdout)["benchmark_runs"] > 0  # cold: tuned, then pushed
    assert '"warm": true' in first.stdout or "extra.warm: True" in first.stdout  # `bundler show` of the ref
    # The next pipeline, on a fresh runner: pulls the ref, benchmarks nothing.
    second = run_shell(script, shell_env(s3_server, tmp_path, "runner-2", **variables), work)
    assert second.returncode == 0, second.stderr
    assert job_report(second.stdout)["benchmark_runs"] == 0


def test_torchrun_ranks_download_once(s3_server, tmp_path):
    work = workdir(tmp_path)
    env = shell_env(s3_server, tmp_path, "ci")
    baked = run_shell("bundler warm --ref node/startup -- python examples/demo_job.py --quick", env, work)
    assert baked.returncode == 0, baked.stderr
    node = shell_env(s3_server, tmp_path, "node-1", BUNDLER_REF="node/startup")
    result = run_shell("python examples/torchrun_startup.py --nproc 4", node, work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"ranks": 4, "all_hit": True, "downloads": 1}


def test_airgap_script(s3_server, tmp_path):
    work = workdir(tmp_path)
    online = shell_env(s3_server, tmp_path, "ci")
    baked = run_shell("bundler warm --ref ci/main -- python examples/demo_job.py --quick", online, work)
    assert baked.returncode == 0, baked.stderr
    cluster = shell_env(s3_server, tmp_path, "cluster-node", REF="ci/main", MIRROR=str(tmp_path / "mirror"))
    result = run_shell("bash examples/airgap.sh", cluster, work)
    assert result.returncode == 0, result.stderr
    assert job_report(result.stdout)["benchmark_runs"] == 0 and job_report(result.stdout)["bundle_hit"]
    assert (tmp_path / "mirror" / "v1" / "refs" / "ci" / "main.json").is_file()
