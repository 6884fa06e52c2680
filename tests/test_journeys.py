"""The README's journeys, run exactly as written: CI prebake, job start, offline, housekeeping.

Each ```sh block under "## Journeys" runs in bash against moto over HTTP on 127.0.0.1, each
journey on its own fresh "machine" (empty local caches), in the order a user lives them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from test_examples import REPO, job_report, run_shell, shell_env, workdir


def journeys() -> dict[str, str]:
    """``### title -> the sh block under it`` for the README's Journeys section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Journeys", 1)[1].split("\n## ", 1)[0]
    found = {}
    for part in section.split("\n### ")[1:]:
        title = part.splitlines()[0].strip()
        blocks = re.findall(r"```sh\n(.*?)```", part, re.S)
        assert len(blocks) == 1, f"journey {title!r} needs exactly one sh block"
        found[title] = blocks[0]
    return found


def test_readme_keeps_its_first_screen():
    head = (REPO / "README.md").read_text().split("## ", 1)[0]
    assert "make demo" in head and "make test" in head


def test_the_readme_journeys_run_as_written(s3_server, tmp_path):
    steps = journeys()
    assert list(steps) == ["CI prebake", "Job start", "Offline (air-gapped clusters)", "Keeping the bucket tidy"]
    work = workdir(tmp_path)

    ci = run_shell(steps["CI prebake"], shell_env(s3_server, tmp_path, "ci-runner"), work)
    assert ci.returncode == 0, ci.stderr
    assert job_report(ci.stdout)["benchmark_runs"] > 0  # the prebake tuned ...
    assert "extra.warm: True" in ci.stdout and "extra.host:" in ci.stdout  # ... and `show` says who made it

    again = run_shell(steps["CI prebake"], shell_env(s3_server, tmp_path, "ci-runner-2"), work)
    assert again.returncode == 0 and job_report(again.stdout)["benchmark_runs"] == 0  # the second warm run

    job = run_shell(steps["Job start"], shell_env(s3_server, tmp_path, "node-1"), work)
    assert job.returncode == 0, job.stderr
    report = job_report(job.stdout)
    assert report["bundle_hit"] and report["benchmark_runs"] == 0 and report["pushed"] is None
    summary = [line for line in job.stderr.splitlines() if ": hit (ref demo/cpu)" in line]
    assert len(summary) == 1 and summary[0].startswith("bundler: INFO: compile ")

    offline = run_shell(steps["Offline (air-gapped clusters)"], shell_env(s3_server, tmp_path, "cluster-node"), work)
    assert offline.returncode == 0, offline.stderr
    assert job_report(offline.stdout)["benchmark_runs"] == 0
    assert (work / "mirror" / "v1" / "refs" / "demo" / "cpu.json").is_file()

    tidy = run_shell(steps["Keeping the bucket tidy"], shell_env(s3_server, tmp_path, "ci-runner"), work)
    assert tidy.returncode == 0, tidy.stderr
    assert "demo/cpu" in tidy.stdout and "dry run" in tidy.stdout and "autotune/" in tidy.stdout
    listing = run_shell("bundler ls --json", shell_env(s3_server, tmp_path, "x"), work)
    assert [r["name"] for r in json.loads(listing.stdout)["refs"]] == ["demo/cpu"]  # gc kept the one ref


def test_journey_commands_only_use_existing_verbs():
    from bundler.cli import EXAMPLES

    for block in journeys().values():
        for verb in re.findall(r"(?m)^bundler (\w+)", block):
            assert verb in EXAMPLES, verb
    assert Path(REPO / "examples" / "demo_job.py").is_file()


def test_operations_doc_roles_are_least_privilege():
    """docs/operations.md: readers write nothing, writers delete nothing, only gc deletes; the
    lifecycle rule aborts incomplete uploads and never expires bundles or refs (gc decides those)."""
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", (REPO / "docs/operations.md").read_text(), re.S)]
    reader, writer, collector, lifecycle = blocks

    def actions(policy: dict) -> set[str]:
        return {a for st in policy["Statement"] for a in st["Action"]}

    assert not {a for a in actions(reader) if a.startswith(("s3:Put", "s3:Delete"))}
    assert "s3:PutObject" in actions(writer) and "s3:DeleteObject" not in actions(writer)
    assert "s3:DeleteObject" in actions(collector) and "s3:PutObject" not in actions(collector)
    rules = lifecycle["Rules"]
    assert any("AbortIncompleteMultipartUpload" in r for r in rules)
    expiring = [r["Filter"]["Prefix"] for r in rules if "Expiration" in r]
    assert all(not p.endswith(("bundles/", "refs/", "v1/")) for p in expiring)
