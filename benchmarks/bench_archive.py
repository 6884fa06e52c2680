"""Pack and unpack: ``bundler`` against ``tar | zstd -T0 -3`` and ``zstd -dc | tar -x``.

Whole commands (interpreter start included) and the library calls in-process, destinations on
tmpfs. Every round runs each variant once, ours and the baseline side by side, so load on a shared
machine hits both alike; the table gives each variant's median over the rounds and its spread
(fastest-slowest), and the ratio of the medians (baseline / ours: above 1 means bundler is faster).
Both are also compared with what gives a user bundler's guarantee with tar: ``sha256sum`` of every
file next to ``tar | zstd`` (bundler's manifest holds every file's hash), and ``zstd -dc | tar -x``
followed by ``sha256sum -c`` (tar checks nothing; bundler refuses a bundle unless every byte
matches its manifest).

Usage: ``python benchmarks/bench_archive.py [--repeat N] [--corpus max-autotune,synthetic,real]
[--only unpack|pack]``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import extract_fixture, make_corpus, make_max_autotune_corpus  # noqa: E402
from harness import BUNDLER, cleanup, like_an_installed_package, scratch, shell  # noqa: E402

CORPORA = ("max-autotune", "synthetic", "real")


def corpora(which: list[str]) -> dict[str, Path]:
    found = {}
    if "max-autotune" in which:
        root = scratch("max-autotune")
        files, size = make_max_autotune_corpus(root)
        found[f"max-autotune-shaped ({files} files, {size / 1e6:.0f} MB)"] = root
    if "synthetic" in which:
        root = scratch("synthetic")
        files, size = make_corpus(root)
        found[f"synthetic ({files} files, {size / 1e6:.0f} MB)"] = root
    if "real" in which:
        for name in ("default_caches.tar.gz", "triton_autotune_caches.tar.gz"):
            try:
                root = extract_fixture(name, scratch(name.split(".")[0]))
            except FileNotFoundError:
                continue
            found[f"real H200 {name.split('.')[0]}"] = root
    return found


def du(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def interleaved(
    variants: dict[str, tuple[Callable[[], None], Callable[[], None]]], rounds: int
) -> dict[str, list[float]]:
    """Wall seconds of each variant, one run of each per round (order rotated each round)."""
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            prepare, run = variants[name]
            prepare()
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return samples


def line(label: str, ours: list[float], theirs: list[float], mb: float) -> str:
    o, t = statistics.median(ours), statistics.median(theirs)
    return (
        f"| {label:<36} | {o:6.3f} s ({min(ours):.3f}-{max(ours):.3f}) | {t:6.3f} s ({min(theirs):.3f}-{max(theirs):.3f})"
        f" | {t / o:5.2f}x | {mb / o:6.0f} MB/s |"
    )


def bench(label: str, src: Path, rounds: int, only: str | None) -> list[str]:
    from bundler.bundle import archive

    work = scratch("work")
    ours_file, theirs_file = work / "ours.tar.zst", work / "theirs.tar.zst"
    dest = work / "dest"
    nfiles, nbytes = du(src)
    mb = nbytes / 1e6
    subprocess.run([*BUNDLER, "pack", str(src), "-o", str(ours_file)], check=True, stdout=subprocess.DEVNULL)
    shell(f"tar -C {src} -cf - . | zstd -q -T0 -3 > {theirs_file}")
    # What a user who wants what bundler guarantees (every byte checked) would add to tar: sha256sum.
    sums = work / "SHA256SUMS"
    shell(f"cd {src} && find . -type f -print0 | xargs -0 sha256sum > {sums}")

    def fresh_dest() -> None:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()

    def nothing() -> None:
        pass

    def unpack_lib() -> None:
        with open(ours_file, "rb") as f:
            archive.unpack(f, dest)

    out = [
        f"{label}: {nfiles} files, {mb:.1f} MB; bundle {ours_file.stat().st_size / 1e6:.2f} MB, "
        f"tar | zstd -3 {theirs_file.stat().st_size / 1e6:.2f} MB "
        f"({theirs_file.stat().st_size / ours_file.stat().st_size:.2f}x smaller)",
        "| operation | ours: median (spread) | baseline: median (spread) | ratio | ours MB/s |",
        "| --- | --- | --- | --- | --- |",
    ]

    def command(*args: str):  # noqa: ANN202 - one whole `bundler` command, as users run it
        return lambda: subprocess.run([*BUNDLER, *args], check=True, stdout=subprocess.DEVNULL)

    if only in (None, "unpack"):
        s = interleaved(
            {
                "cmd": (fresh_dest, command("unpack", str(ours_file), "--into", str(dest))),
                "raw": (fresh_dest, command("unpack", str(ours_file), "--into", str(dest), "--raw")),
                "lib": (fresh_dest, unpack_lib),
                "base": (fresh_dest, lambda: shell(f"zstd -q -dc {theirs_file} | tar -C {dest} -xf -")),
                "checked": (fresh_dest, lambda: shell(
                    f"zstd -q -dc {theirs_file} | tar -C {dest} -xf - && cd {dest} && sha256sum --quiet --strict -c {sums}"
                )),
            },
            rounds,
        )
        out += [
            line("`archive.unpack` in-process", s["lib"], s["base"], mb),
            line("`bundler unpack`", s["cmd"], s["base"], mb),
            line("`bundler unpack --raw`", s["raw"], s["base"], mb),
            "| against `zstd -dc \\| tar -x` then `sha256sum -c` (every file checked, as bundler does): | | | | |",
            line("`archive.unpack` in-process", s["lib"], s["checked"], mb),
            line("`bundler unpack`", s["cmd"], s["checked"], mb),
        ]
    if only in (None, "pack"):
        s = interleaved(
            {
                "cmd": (
                    lambda: ours_file.unlink(missing_ok=True),  # pack -o refuses to replace a file
                    command("pack", str(src), "-o", str(ours_file)),
                ),
                "lib": (nothing, lambda: archive.pack(src, io.BytesIO())),
                "base": (nothing, lambda: shell(f"tar -C {src} -cf - . | zstd -q -T0 -3 > {theirs_file}")),
                "checked": (nothing, lambda: shell(
                    f"cd {src} && find . -type f -print0 | xargs -0 sha256sum > {sums}.new "
                    f"&& tar -cf - . | zstd -q -T0 -3 > {theirs_file}"
                )),
            },
            rounds,
        )
        out += [
            line("`archive.pack` in-process", s["lib"], s["base"], mb),
            line("`bundler pack`", s["cmd"], s["base"], mb),
            "| against `sha256sum` of every file, then `tar \\| zstd -T0 -3` (a manifest of hashes, as bundler writes): | | | | |",
            line("`archive.pack` in-process", s["lib"], s["checked"], mb),
            line("`bundler pack`", s["cmd"], s["checked"], mb),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=9, help="rounds (each runs every variant once)")
    parser.add_argument("--corpus", default=",".join(CORPORA), help=f"comma-separated subset of {CORPORA}")
    parser.add_argument("--only", choices=("unpack", "pack"))
    args = parser.parse_args()
    for tool in ("tar", "zstd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed for the baseline; install it (apt-get install {tool})")
    which = [c.strip() for c in args.corpus.split(",") if c.strip()]
    if unknown := set(which) - set(CORPORA):
        sys.exit(f"unknown corpus {sorted(unknown)}; choose from {CORPORA}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} cores, load {load}; tmpfs; {args.repeat} interleaved rounds; "
        f"bundler = {' '.join(BUNDLER)}"
    )
    like_an_installed_package()
    try:
        for label, src in corpora(which).items():
            for text in bench(label, src, args.repeat, args.only):
                print(text, flush=True)
    finally:
        cleanup()
    print(f"load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
