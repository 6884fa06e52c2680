"""Pull from S3: ``bundler pull`` against one-archive and one-object-per-file alternatives.

A moto S3 server runs on loopback inside this process. For each corpus, set-up (untimed) uploads
the bundle with ``bundler push``, a plain ``tar | zstd -T0 -3`` archive, and every file as its own
object. Then, in the same run, each contender is timed as a whole command, interpreter start
included, into a destination on tmpfs emptied (untimed) before every run; median of several runs:

- ours:      ``python -m bundler.cli pull DIGEST --remote URL --into DEST``
- baseline:  ``python -c "boto3 ... download_file(...)" && zstd -dc FILE | tar -xf - -C DEST``
- unbundled: a fresh Python fetching every file with 16 threads and one shared boto3 client

MB/s are of the unpacked corpus. Ratio > 1 means bundler is faster.
Usage: ``python benchmarks/bench_pull.py [--repeat N] [--skip-unbundled] [--corpus synthetic|real|all]``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    BUNDLER,
    DOWNLOAD_FILE,
    PER_FILE_GET,
    PER_FILE_PUT,
    delete_prefix,
    row_vs,
    run_checked,
    s3_client,
    s3_main,
    scratch,
    timed,
    tree_files,
    tree_size,
)

BUCKET = "bench-pull"


def check_same(src: Path, dest: Path, what: str, relocated: bool = False) -> None:
    """Same files with the same bytes (empty directories are not files: bundles do not carry them).

    With ``relocated``, Triton ``__grp__*.json`` files must instead name their children in ``dest``
    (``bundler pull`` rewrites those absolute paths for where the files land); nothing else may differ.
    """
    names = tree_files(src)
    if tree_files(dest) != names:
        raise SystemExit(f"{what}: the destination holds other files than the source")
    _, mismatch, errors = filecmp.cmpfiles(src, dest, names, shallow=False)
    if relocated:
        mismatch = [name for name in mismatch if not _relocated_group(src, dest, name)]
    if mismatch or errors:
        raise SystemExit(f"{what}: files differ from the source: {(mismatch + errors)[:5]}")


def _relocated_group(src: Path, dest: Path, name: str) -> bool:
    if not Path(name).name.startswith("__grp__"):
        return False
    want = json.loads((src / name).read_bytes())
    folder = str((dest / name).parent)
    want["child_paths"] = {k: os.path.join(folder, os.path.basename(v)) for k, v in want["child_paths"].items()}
    return json.loads((dest / name).read_bytes()) == want


def bench(label: str, src: Path, endpoint: str, args: argparse.Namespace) -> list[str]:
    client = s3_client(endpoint, pool=16)
    slug = label.replace(" ", "-")
    url = f"s3://{BUCKET}/{slug}/ours?endpoint={endpoint}&addressing=path"
    work = scratch("work")
    dest, tmp = work / "dest", work / "download.tar.zst"
    nfiles, nbytes = tree_size(src)
    mb = nbytes / 1e6

    # --- set-up, untimed: the three ways of storing the same files --------------------------------
    t0 = time.perf_counter()
    digest = run_checked([*BUNDLER, "push", str(src), "--remote", url]).strip()
    bundle_size = client.head_object(Bucket=BUCKET, Key=f"{slug}/ours/v1/bundles/{digest}.tar.zst")["ContentLength"]
    archive = work / "baseline.tar.zst"
    run_checked(f"tar -C {shlex.quote(str(src))} -cf - . | zstd -q -T0 -3 > {shlex.quote(str(archive))}")
    archive_key = f"{slug}/baseline/corpus.tar.zst"
    client.upload_file(str(archive), BUCKET, archive_key)
    listing = work / "files.txt"
    listing.write_text("\n".join(tree_files(src)) + "\n")
    per_file_prefix = f"{slug}/unbundled/"
    if not args.skip_unbundled:
        run_checked([sys.executable, "-c", PER_FILE_PUT, endpoint, BUCKET, per_file_prefix, str(listing), str(src)])
    setup = time.perf_counter() - t0

    def fresh() -> None:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        tmp.unlink(missing_ok=True)

    ours_cmd = [*BUNDLER, "pull", digest, "--remote", url, "--into", str(dest)]
    baseline_cmd = (
        f"{shlex.join([sys.executable, '-c', DOWNLOAD_FILE, endpoint, BUCKET, archive_key, str(tmp)])}"
        f" && zstd -q -dc {shlex.quote(str(tmp))} | tar -C {shlex.quote(str(dest))} -xf -"
    )
    unbundled_cmd = [sys.executable, "-c", PER_FILE_GET, endpoint, BUCKET, per_file_prefix, str(listing), str(dest)]

    # --- correctness once, before any timing: a broken pull must not be measured ------------------
    fresh()
    if run_checked(ours_cmd).strip() != digest:
        raise SystemExit("bundler pull printed an unexpected digest")
    check_same(src, dest, "bundler pull", relocated=True)

    ours = timed(lambda: run_checked(ours_cmd), fresh, args.repeat)
    baseline = timed(lambda: run_checked(baseline_cmd), fresh, args.repeat)
    check_same(src, dest, "the download_file + zstd | tar baseline")
    lines = [
        f"{label}: {nfiles} files, {mb:.1f} MB unpacked; bundle {bundle_size / 1e6:.2f} MB, "
        f"tar|zstd -3 {archive.stat().st_size / 1e6:.2f} MB; set-up {setup:.1f} s",
        "  " + row_vs("pull vs download_file+zstd|tar", ours, "baseline", baseline, mb),
    ]
    if not args.skip_unbundled:
        unbundled = timed(lambda: run_checked(unbundled_cmd), fresh, args.unbundled_repeat)
        check_same(src, dest, "the per-file fetch")
        lines.append("  " + row_vs(f"pull vs {nfiles} GETs x16 threads", ours, "unbundled", unbundled, mb))
    delete_prefix(client, BUCKET, f"{slug}/")
    return lines


def main() -> None:
    s3_main(__doc__, "bench_pull", "fetch", "destinations on tmpfs", bench, BUCKET)


if __name__ == "__main__":
    main()
