"""Push to S3: ``bundler push`` against one-archive and one-object-per-file alternatives.

A moto S3 server runs on loopback inside this process. For each corpus, each contender is timed
as a whole command, interpreter start included, median of several runs in the same process run;
every run writes under a fresh prefix, so each one really uploads (``bundler push`` skips bundles
that already exist), and the objects are deleted afterwards, untimed:

- ours:      ``python -m bundler.cli push DIR --remote s3://bucket/PREFIX_i?endpoint=...``
- baseline:  ``tar -cf - . | zstd -T0 -3 > FILE && python -c "boto3 ... upload_file(...)"``
- unbundled: a fresh Python putting every file as its own object with 16 threads, one client

MB/s are of the source tree. Ratio > 1 means bundler is faster.
Usage: ``python benchmarks/bench_push.py [--repeat N] [--skip-unbundled] [--corpus synthetic|real|all]``.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    BUNDLER,
    PER_FILE_PUT,
    UPLOAD_FILE,
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

BUCKET = "bench-push"


def count(client, prefix: str) -> int:  # noqa: ANN001
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sum(len(page.get("Contents", ())) for page in pages)


def bench(label: str, src: Path, endpoint: str, args: argparse.Namespace) -> list[str]:
    client = s3_client(endpoint, pool=16)
    slug = label.replace(" ", "-")
    work = scratch("work")
    archive = work / "baseline.tar.zst"
    listing = work / "files.txt"
    listing.write_text("\n".join(tree_files(src)) + "\n")
    nfiles, nbytes = tree_size(src)
    mb = nbytes / 1e6
    runs = itertools.count()

    def url(i: int) -> str:
        return f"s3://{BUCKET}/{slug}/ours-{i}?endpoint={endpoint}&addressing=path"

    def no_archive() -> None:
        archive.unlink(missing_ok=True)

    # --- correctness once, before any timing: one object, the same digest every time --------------
    digest = run_checked([*BUNDLER, "push", str(src), "--remote", url(next(runs))]).strip()
    check = run_checked([*BUNDLER, "pull", digest, "--remote", url(0), "--into", str(work / "check")]).strip()
    if check != digest or count(client, f"{slug}/ours-0/v1/bundles/") != 1:
        raise SystemExit("bundler push did not leave exactly one bundle that pulls back under its digest")
    shutil.rmtree(work / "check")
    bundle_size = client.head_object(Bucket=BUCKET, Key=f"{slug}/ours-0/v1/bundles/{digest}.tar.zst")["ContentLength"]

    def push_ours() -> None:
        out = run_checked([*BUNDLER, "push", str(src), "--remote", url(next(runs))]).strip()
        if out != digest:
            raise SystemExit(f"bundler push gave digest {out}, expected {digest} (not deterministic?)")

    ours = timed(push_ours, repeat=args.repeat)

    baseline_runs = itertools.count()

    def push_baseline() -> None:
        key = f"{slug}/baseline-{next(baseline_runs)}/corpus.tar.zst"
        run_checked(
            f"tar -C {shlex.quote(str(src))} -cf - . | zstd -q -T0 -3 > {shlex.quote(str(archive))}"
            f" && {shlex.join([sys.executable, '-c', UPLOAD_FILE, endpoint, BUCKET, key, str(archive)])}"
        )

    baseline = timed(push_baseline, no_archive, args.repeat)
    if client.head_object(Bucket=BUCKET, Key=f"{slug}/baseline-0/corpus.tar.zst")["ContentLength"] == 0:
        raise SystemExit("the baseline uploaded an empty archive")
    lines = [
        f"{label}: {nfiles} files, {mb:.1f} MB; bundle {bundle_size / 1e6:.2f} MB, "
        f"tar|zstd -3 {archive.stat().st_size / 1e6:.2f} MB",
        "  " + row_vs("push vs tar|zstd+upload_file", ours, "baseline", baseline, mb),
    ]
    if not args.skip_unbundled:
        unbundled_runs = itertools.count()

        def push_unbundled() -> None:
            prefix = f"{slug}/unbundled-{next(unbundled_runs)}/"
            run_checked([sys.executable, "-c", PER_FILE_PUT, endpoint, BUCKET, prefix, str(listing), str(src)])

        unbundled = timed(push_unbundled, repeat=args.unbundled_repeat)
        if count(client, f"{slug}/unbundled-0/") != nfiles:
            raise SystemExit("the per-file upload did not store one object per file")
        lines.append("  " + row_vs(f"push vs {nfiles} PUTs x16 threads", ours, "unbundled", unbundled, mb))
    delete_prefix(client, BUCKET, f"{slug}/")
    return lines


def main() -> None:
    s3_main(__doc__, "bench_push", "upload", "sources and temp files on tmpfs", bench, BUCKET)


if __name__ == "__main__":
    main()
