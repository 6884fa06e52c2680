"""Pack and unpack: ``bundler`` against ``tar | zstd -T0 -3`` and ``zstd -dc | tar -x``.

Whole commands, interpreter start included, destinations on tmpfs, each timed as the median of
several runs in the same process run, so the ratio compares like with like. Ratio > 1 means
bundler is faster. Usage: ``python benchmarks/bench_archive.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import extract_fixture, make_corpus  # noqa: E402
from harness import BUNDLER, cleanup, like_an_installed_package, row, scratch, shell, timed  # noqa: E402


def corpora() -> dict[str, Path]:
    found = {}
    synthetic = scratch("synthetic")
    files, size = make_corpus(synthetic)
    found[f"synthetic ({files} files, {size / 1e6:.0f} MB)"] = synthetic
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


def bench(label: str, src: Path, repeat: int) -> list[str]:
    work = scratch("work")
    ours_file, theirs_file = work / "ours.tar.zst", work / "theirs.tar.zst"
    dest = work / "dest"
    nfiles, nbytes = du(src)
    mb = nbytes / 1e6

    pack_ours = timed(lambda: subprocess.run([*BUNDLER, "pack", str(src), "-o", str(ours_file)], check=True,
                                             stdout=subprocess.DEVNULL), repeat=repeat)
    pack_theirs = timed(lambda: shell(f"tar -C {src} -cf - . | zstd -q -T0 -3 > {theirs_file}"), repeat=repeat)

    def fresh_dest() -> None:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()

    unpack_ours = timed(lambda: subprocess.run([*BUNDLER, "unpack", str(ours_file), "--into", str(dest)],
                                               check=True, stdout=subprocess.DEVNULL), fresh_dest, repeat)
    unpack_raw = timed(lambda: subprocess.run([*BUNDLER, "unpack", str(ours_file), "--into", str(dest), "--raw"],
                                              check=True, stdout=subprocess.DEVNULL), fresh_dest, repeat)
    unpack_theirs = timed(lambda: shell(f"zstd -q -dc {theirs_file} | tar -C {dest} -xf -"), fresh_dest, repeat)
    # The library path (begin_compile inside a running job) pays no interpreter start or imports.
    from bundler.bundle import archive

    pack_lib = timed(lambda: _pack_in_process(archive, src), repeat=repeat)
    unpack_lib = timed(lambda: _unpack_in_process(archive, ours_file, dest), fresh_dest, repeat)
    sizes = f"{ours_file.stat().st_size / 1e6:.2f} MB vs {theirs_file.stat().st_size / 1e6:.2f} MB"
    return [
        f"{label}: {nfiles} files, {mb:.1f} MB; compressed ours {sizes} "
        f"({theirs_file.stat().st_size / ours_file.stat().st_size:.2f}x smaller)",
        "  " + row("pack   vs tar | zstd -T0 -3", pack_ours, pack_theirs, mb),
        "  " + row("unpack vs zstd -dc | tar -x", unpack_ours, unpack_theirs, mb),
        "  " + row("unpack --raw (no group relocation)", unpack_raw, unpack_theirs, mb),
        "  " + row("pack   in-process (library)", pack_lib, pack_theirs, mb),
        "  " + row("unpack in-process (library)", unpack_lib, unpack_theirs, mb),
    ]


def _pack_in_process(archive, src: Path) -> None:
    import io

    archive.pack(src, io.BytesIO())


def _unpack_in_process(archive, bundle: Path, dest: Path) -> None:
    with open(bundle, "rb") as f:
        archive.unpack(f, dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    for tool in ("tar", "zstd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed for the baseline; install it (apt-get install {tool})")
    print(f"machine: {os.cpu_count()} cores, scratch on tmpfs; median of {args.repeat} runs")
    like_an_installed_package()
    try:
        for label, src in corpora().items():
            for line in bench(label, src, args.repeat):
                print(line, flush=True)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
