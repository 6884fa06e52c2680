"""Timing helpers shared by the benchmarks: whole commands, repeated, median, same run."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# What a user runs: the console script pip puts next to the interpreter (``-m`` would add runpy).
_SCRIPT = Path(sys.executable).with_name("bundler")
BUNDLER = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "bundler.cli"]
SCRATCH_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def like_an_installed_package() -> None:
    """Byte-compile bundler, as ``pip install`` does, before timing whole commands.

    With ``PYTHONDONTWRITEBYTECODE`` set (as on the development machine) every ``bundler`` process
    would otherwise compile its modules from source, ~10 ms that no installed copy pays.
    """
    import compileall

    import bundler

    compileall.compile_dir(Path(bundler.__file__).parent, quiet=1)


def scratch(name: str) -> Path:
    """A fresh folder on tmpfs: this machine's disk is too noisy for ratios."""
    path = SCRATCH_ROOT / f"bundler-bench-{os.getpid()}" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def cleanup() -> None:
    shutil.rmtree(SCRATCH_ROOT / f"bundler-bench-{os.getpid()}", ignore_errors=True)


def shell(command: str) -> None:
    subprocess.run(command, shell=True, check=True, stdout=subprocess.DEVNULL)


def timed(run: Callable[[], None], prepare: Callable[[], None] = lambda: None, repeat: int = 5) -> float:
    """Median wall seconds of ``run`` over ``repeat`` runs, ``prepare`` untimed before each."""
    samples = []
    for _ in range(repeat):
        prepare()
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def row(label: str, ours: float, theirs: float, megabytes: float) -> str:
    return (
        f"{label:<34} ours {ours:7.3f} s {megabytes / ours:8.1f} MB/s | "
        f"baseline {theirs:7.3f} s {megabytes / theirs:8.1f} MB/s | ratio {theirs / ours:5.2f}x"
    )


# --- additions for the store benchmarks (bench_pull.py, bench_push.py) ----------------------------

REGION = "us-east-1"


def run_checked(command: list[str] | str) -> str:
    """Run a command (a list, or a shell string), stdout returned, stderr shown if it fails."""
    done = subprocess.run(command, shell=isinstance(command, str), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command!r} exited {done.returncode}:\n{done.stderr.strip()}")
    return done.stdout


def fake_aws_env() -> None:
    """Fake credentials and no AWS config files or instance metadata, for us and every child command."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION,
        AWS_CONFIG_FILE="/nonexistent/aws-config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
        AWS_EC2_METADATA_DISABLED="true",
    )


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on a free loopback port, in this process; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    fake_aws_env()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str, pool: int = 10):  # noqa: ANN201 - botocore client, untyped
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, config=Config(max_pool_connections=pool))


def delete_prefix(client, bucket: str, prefix: str) -> int:  # noqa: ANN001
    """Delete every object under ``prefix`` (untimed housekeeping, so moto's memory stays small)."""
    deleted = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            deleted += len(keys)
    return deleted


def tree_files(root: Path) -> list[str]:
    """Every file under ``root`` as a sorted list of '/'-separated relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def pick_corpora(which: str) -> dict[str, Path]:
    """``synthetic`` (make_corpus), ``real`` (the two H200 fixtures, if present) or ``all``."""
    from corpus import extract_fixture, make_corpus

    found: dict[str, Path] = {}
    if which in ("synthetic", "all"):
        synthetic = scratch("synthetic")
        make_corpus(synthetic)
        found["synthetic"] = synthetic
    if which in ("real", "all"):
        for name in ("default_caches.tar.gz", "triton_autotune_caches.tar.gz"):
            stem = name.split(".")[0]
            try:
                found[f"real H200 {stem}"] = extract_fixture(name, scratch(stem))
            except FileNotFoundError:
                print(f"(fixture {name} not found; skipped)")
    return found


def row_vs(label: str, ours: float, other: str, theirs: float, megabytes: float) -> str:
    """Like :func:`row`, naming the alternative; ratio > 1 means ours is faster."""
    return (
        f"{label:<30} ours {ours:7.3f} s {megabytes / ours:7.1f} MB/s | "
        f"{other} {theirs:7.3f} s {megabytes / theirs:7.1f} MB/s | ratio {theirs / ours:6.2f}x"
    )


# The unbundled alternative: one object per file, 16 threads, one shared client. Run as
# ``python -c CODE ENDPOINT BUCKET PREFIX LISTING DIR``; LISTING holds one relative path per line.
PER_FILE_PUT = """
import sys
from concurrent.futures import ThreadPoolExecutor
import boto3
from botocore.config import Config
endpoint, bucket, prefix, listing, root = sys.argv[1:6]
client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=16))
def put(name):
    with open(root + "/" + name, "rb") as f:
        client.put_object(Bucket=bucket, Key=prefix + name, Body=f)
with ThreadPoolExecutor(16) as pool:
    list(pool.map(put, open(listing).read().splitlines()))
"""

PER_FILE_GET = """
import os, sys
from concurrent.futures import ThreadPoolExecutor
import boto3
from botocore.config import Config
endpoint, bucket, prefix, listing, root = sys.argv[1:6]
client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=16))
def get(name):
    path = root + "/" + name
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = client.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
    with open(path, "wb") as f:
        f.write(data)
with ThreadPoolExecutor(16) as pool:
    list(pool.map(get, open(listing).read().splitlines()))
"""

# The single-archive baseline: boto3's managed transfer of one file (s3transfer defaults).
# ``python -c CODE ENDPOINT BUCKET KEY FILE``.
DOWNLOAD_FILE = (
    "import sys, boto3; e, b, k, f = sys.argv[1:5]; boto3.client('s3', endpoint_url=e).download_file(b, k, f)"
)
UPLOAD_FILE = (
    "import sys, boto3; e, b, k, f = sys.argv[1:5]; boto3.client('s3', endpoint_url=e).upload_file(f, b, k)"
)


def s3_main(doc: str, name: str, what: str, where: str, bench: Callable, bucket: str) -> None:
    """The shared command line and loop of bench_pull and bench_push: one moto server, each corpus."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing of ours and the baseline (median)")
    parser.add_argument("--unbundled-repeat", type=int, default=2, help=f"runs of the slow per-file {what}")
    parser.add_argument("--skip-unbundled", action="store_true", help=f"leave out the per-file {what}")
    parser.add_argument("--corpus", choices=("synthetic", "real", "all"), default="all")
    args = parser.parse_args()
    for tool in ("tar", "zstd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed for the baseline; install it (apt-get install {tool})")
    print(
        f"{name}: {os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"moto S3 on loopback; {where}; median of {args.repeat} runs "
        f"({args.unbundled_repeat} for unbundled); whole commands incl. interpreter start",
        flush=True,
    )
    tuned = {k: v for k, v in os.environ.items() if k.startswith("BUNDLER_")}
    if tuned:
        print(f"settings from the environment: {tuned}")
    like_an_installed_package()
    try:
        with moto_s3() as endpoint:
            s3_client(endpoint).create_bucket(Bucket=bucket)
            for label, src in pick_corpora(args.corpus).items():
                for line in bench(label, src, endpoint, args):
                    print(line, flush=True)
    finally:
        cleanup()
    print(f"load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
