"""torch.compile on CPU: first-call time cold, warm-local and warm-from-bundle, a fresh process each.

Each round uses new directories (Inductor's cache dir and the default dir holding the precompiled
headers, via ``TMPDIR``) and moto's S3 server on 127.0.0.1 in this process:

0. cold-plain: empty caches, no session: what the job costs without kernel-bundler;
1. cold: empty caches; the job compiles inside ``compile_cache`` and pushes the bundle;
2. warm-local: the same directories again, no bundle (what a second run on the same node gets);
3. warm-from-bundle: empty caches at another path (the cold run's directories renamed away):
   ``compile_cache`` pulls and unpacks the bundle, then the job runs.

Reported per phase: the session's ``begin`` (what runs before the job continues: the facts, ref
lookup, download and unpack run in the background and the first compile waits for them), the
first training step (compile included) and their sum, medians over ``--repeat`` rounds; and the
cost of a cold session: its ``end`` (snapshot, pack and push) and ``begin`` against the cold
compile, and cold against cold-plain: the first step with ``begin``, and with ``begin`` and ``end``
per round, plus the CPU the session's threads added in the job's process (steadier than wall
time on a shared machine; the compiler's child processes are not counted). Targets: warm-from-bundle within 1.2x of warm-local
(issue 10); a cold session adds at most 3% (issue 12).

Run: ``.venv/bin/python benchmarks/bench_torch_compile.py [--repeat 3] [--width 64] [--layers 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import SCRATCH_ROOT, moto_s3, s3_client  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "scripts" / "torch_compile_job.py"


def job(root: Path, url: str | None, extra: list[str]) -> dict:
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUNDLER_", "TORCHINDUCTOR_", "TRITON_"))}
    env.update(TMPDIR=str(root / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(root / "inductor"),
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(JOB), *extra] + (["--bundle", url] if url else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("JOB-REPORT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"job failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("JOB-REPORT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    extra = ["--width", str(args.width), "--layers", str(args.layers)]
    base = SCRATCH_ROOT / f"bundler-bench-torch-{os.getpid()}"
    results: dict[str, list[tuple[float, float]]] = {"cold-plain": [], "cold": [], "warm-local": [],
                                                     "warm-from-bundle": []}
    session_cost: list[float] = []
    # (cold job incl. its end) / cold-plain, and the CPU the session's threads added (seconds)
    cold_cost: list[tuple[float, float, float]] = []
    notes: list[str] = []
    with moto_s3() as endpoint:
        for round_ in range(args.repeat):
            bucket = f"bench-torch-{uuid.uuid4().hex[:10]}"
            s3_client(endpoint).create_bucket(Bucket=bucket)
            url = f"s3://{bucket}/caches?endpoint={endpoint}&addressing=path"
            here, there = base / f"r{round_}-a", base / f"r{round_}-b"
            if round_ % 2:  # alternate which of the two cold jobs runs first: no order bias
                cold = job(here, url, extra)
                plain = job(base / f"r{round_}-plain", None, extra)
            else:
                plain = job(base / f"r{round_}-plain", None, extra)
                cold = job(here, url, extra)
            session_cost.append((cold["begin_s"] + cold["end_s"]) / (cold["begin_s"] + cold["first_call_s"]))
            cold_cost.append((
                (cold["begin_s"] + cold["first_call_s"] + cold["end_s"]) / plain["first_call_s"],
                cold["cpu_self_s"] - plain["cpu_self_s"],
                cold["cpu_main_s"] - plain["cpu_main_s"],
            ))
            local = job(here, None, extra)
            here.rename(base / f"r{round_}-a.away")
            warm = job(there, url, extra)
            for name, rep in (("cold-plain", plain), ("cold", cold), ("warm-local", local),
                              ("warm-from-bundle", warm)):
                results[name].append((rep["begin_s"], rep["first_call_s"]))
            notes.append(f"round {round_}: cold {cold['summary']!r}\n  bundle {warm['summary']!r}\n"
                         f"  warm-local counters {local['inductor']} builds {local['cpp_builds']}\n"
                         f"  bundle counters {warm['inductor']} {warm['aot_autograd']} builds {warm['cpp_builds']}")
            shutil.rmtree(base, ignore_errors=True)
    print(f"torch {__import__('torch').__version__}, MLP {args.layers}x{args.width}, batch 8, fwd+bwd, "
          f"{args.repeat} rounds (medians, seconds)")
    print("| phase | begin (facts, fetch, unpack) | first step (compile incl.) | total | every round's total |")
    print("| --- | --- | --- | --- | --- |")
    med = {}
    for name, rows in results.items():
        b = statistics.median(r[0] for r in rows)
        f = statistics.median(r[1] for r in rows)
        t = statistics.median(r[0] + r[1] for r in rows)
        med[name] = t
        every = ", ".join(f"{r[0] + r[1]:.2f}" for r in rows)
        print(f"| {name} | {b:.2f} | {f:.2f} | {t:.2f} | {every} |")
    ratios = sorted((b[0] + b[1]) / (w[0] + w[1]) for b, w in zip(results["warm-from-bundle"], results["warm-local"], strict=True))
    print(f"per-round warm-from-bundle / warm-local: {', '.join(f'{r:.2f}x' for r in ratios)}")
    print(f"warm-from-bundle / warm-local: {med['warm-from-bundle'] / med['warm-local']:.2f}x; "
          f"cold / warm-from-bundle: {med['cold'] / med['warm-from-bundle']:.1f}x")
    print(f"cold session's own time (begin + end) / cold compile: "
          f"{', '.join(f'{100 * c:.1f}%' for c in sorted(session_cost))} (median {100 * statistics.median(session_cost):.1f}%); "
          f"cold / cold-plain (first step incl. begin): {med['cold'] / med['cold-plain']:.3f}x")
    print(f"cold incl. begin and end / cold-plain, every round: "
          f"{', '.join(f'{c[0]:.3f}x' for c in cold_cost)} (median {statistics.median(c[0] for c in cold_cost):.3f}x); "
          f"CPU the session added in the job's process (not its compiler children): "
          f"{', '.join(f'{c[1]:+.2f}' for c in cold_cost)} s, of which on the job's thread "
          f"{', '.join(f'{c[2]:+.2f}' for c in cold_cost)} s")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
