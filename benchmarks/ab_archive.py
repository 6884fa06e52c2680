"""A/B of two copies of the ``bundler`` package on the library calls: unpack, verify and pack.

For a code change on a shared, noisy machine: every round runs each operation once per copy, in
a fresh process each time (imports untimed), alternating which copy goes first, and reports the
median and spread of wall time and of process CPU time (less sensitive to other load than wall).

    git show HEAD:bundler/bundle/prefetch.py > /tmp/a/bundler/bundle/prefetch.py   # etc.
    python benchmarks/ab_archive.py --a /tmp/a --b . [--repeat 9] [--corpus max-autotune]

``--a`` / ``--b`` are folders holding a ``bundler`` package. The bundle is packed once by copy b.

``cmd-unpack`` and ``cmd-pack`` (``--ops unpack,verify,pack,cmd-unpack,cmd-pack``) time whole
``bundler`` commands instead, interpreter start and imports included, as the console script runs
them; CPU is the child's from ``wait4``. Each copy is byte-compiled first (``__pycache__`` next
to its sources, as an installed package has; ``PYTHONDONTWRITEBYTECODE`` would otherwise make
every command compile it from source).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import extract_fixture, make_corpus, make_max_autotune_corpus  # noqa: E402
from harness import cleanup, scratch  # noqa: E402

# Runs in the child: one operation, timed after the imports; prints wall and CPU seconds as JSON.
CHILD = r"""
import io, json, os, shutil, sys, time
from bundler.bundle import archive
op, src, bundle, dest = sys.argv[1:5]
if op == "pack":
    from bundler.bundle import writer  # imported before the clock, as unpack's modules are
if op == "unpack":
    shutil.rmtree(dest, ignore_errors=True); os.mkdir(dest)
t, c = time.perf_counter(), time.process_time()
if op == "unpack":
    with open(bundle, "rb") as f:
        archive.unpack(f, dest)
elif op == "verify":
    with open(bundle, "rb") as f:
        archive.verify(f)
else:
    archive.pack(src, io.BytesIO())
print(json.dumps([time.perf_counter() - t, time.process_time() - c]))
"""


# A whole command, as the console script runs it (``from bundler.cli import run; run()``).
COMMAND = "import sys; sys.argv[0] = 'bundler'; from bundler.cli import run; run()"


def command(tree: str, op: str, src: Path, bundle: Path, dest: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one whole ``bundler`` command run by copy ``tree``."""
    if op == "cmd-unpack":
        shutil.rmtree(dest, ignore_errors=True)
        args = ["unpack", str(bundle), "--into", str(dest)]
    else:
        out = dest.with_name("cmd-pack.tar.zst")
        out.unlink(missing_ok=True)  # pack -o refuses to replace a file (and older copies lack --force)
        args = ["pack", str(src), "-o", str(out)]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", COMMAND, *args], env=env, cwd="/", stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"bundler {op[4:]} from {tree} failed ({status})")
    return wall, usage.ru_utime + usage.ru_stime


def byte_compile(tree: str) -> None:
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(tree, "bundler")], check=True,
                   stdout=subprocess.DEVNULL)


def run(tree: str, op: str, src: Path, bundle: Path, dest: Path) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, op, str(src), str(bundle), str(dest)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
    ).stdout
    wall, cpu = json.loads(out)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", required=True, help="folder holding the 'before' bundler package")
    parser.add_argument("--b", required=True, help="folder holding the 'after' bundler package")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument(
        "--corpus", choices=("max-autotune", "synthetic", "triton_autotune_caches"), default="max-autotune"
    )
    parser.add_argument("--ops", default="unpack,verify,pack")
    args = parser.parse_args()
    unknown = set(args.ops.split(",")) - {"unpack", "verify", "pack", "cmd-unpack", "cmd-pack"}
    if unknown:
        parser.error(f"unknown --ops {sorted(unknown)}")
    src = scratch("src")
    if args.corpus == "max-autotune":
        make_max_autotune_corpus(src)
    elif args.corpus == "synthetic":
        make_corpus(src)
    else:
        extract_fixture(f"{args.corpus}.tar.gz", src)
    bundle, dest = scratch("b") / "bundle.tar.zst", scratch("dest")
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from bundler.bundle import archive; "
            "archive.pack(sys.argv[1], open(sys.argv[2], 'wb'))",
            str(src),
            str(bundle),
        ],
        env=dict(os.environ, PYTHONPATH=os.path.abspath(args.b)),
        check=True,
    )
    print(
        f"A/B on {args.corpus}: {os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"{args.repeat} rounds; a = {args.a}, b = {args.b}"
    )
    print("| operation | a wall: median (spread) | b wall | a CPU | b CPU | b/a wall | b/a CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    if any(op.startswith("cmd-") for op in args.ops.split(",")):
        for side in ("a", "b"):
            byte_compile(getattr(args, side))
    try:
        for op in args.ops.split(","):
            got: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
            for r in range(args.repeat):
                for side in ("a", "b") if r % 2 == 0 else ("b", "a"):
                    if op.startswith("cmd-"):
                        got[side].append(command(getattr(args, side), op, src, bundle, dest))
                    else:
                        got[side].append(run(getattr(args, side), op, src, bundle, dest))

            def cell(side: str, k: int, got: dict[str, list[tuple[float, float]]] = got) -> str:
                values = [x[k] for x in got[side]]
                return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"

            med = {s: [statistics.median(x[k] for x in got[s]) for k in (0, 1)] for s in got}
            print(
                f"| {op} | {cell('a', 0)} | {cell('b', 0)} | {cell('a', 1)} | {cell('b', 1)} | "
                f"{med['b'][0] / med['a'][0]:.2f} | {med['b'][1] / med['a'][1]:.2f} |",
                flush=True,
            )
    finally:
        cleanup()
    print(f"load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
