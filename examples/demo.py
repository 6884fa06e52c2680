"""``make demo``: the main job end to end, with no cloud account.

1. Starts an S3-compatible server (moto) on 127.0.0.1 and creates a bucket.
2. Cold job: autotunes two Triton kernels (interpreter, CPU) inside a compile session, which
   bundles the results and pushes them to the bucket.
3. Wipes every local cache.
4. Fresh job, empty caches at a different path: pulls the bundle and autotunes nothing.
Exits non-zero if the warm job benchmarked anything, so the demo checks its own promise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUCKET = "kernel-bundler-demo"


def start_server():  # noqa: ANN201 - moto's server object
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request access log in the demo
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def job(env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, str(HERE / "demo_job.py")], env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"demo job failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    credentials = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(credentials)
    server, endpoint = start_server()
    work = Path(tempfile.mkdtemp(prefix="kernel-bundler-demo-"))
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        remote = f"s3://{BUCKET}/caches?endpoint={endpoint}&addressing=path"
        print(f"kernel-bundler demo: S3-compatible server (moto) at {endpoint}, remote {remote}\n")

        def env_for(node: str) -> dict[str, str]:
            return {**os.environ, "BUNDLER_REMOTE": remote, "TRITON_INTERPRET": "1",
                    "BUNDLER_CACHE_DIR": str(work / node / "bundler"), "TRITON_CACHE_DIR": str(work / node / "triton")}

        cold = job(env_for("node-a"))
        print(f"[1/3] cold job on node-a: {cold['benchmark_runs']} benchmark runs, {cold['misses']} cache misses, "
              f"{cold['seconds']:.1f} s after imports; pushed bundle {cold['pushed']}")
        shutil.rmtree(work / "node-a")
        print("[2/3] wiped node-a's local caches")
        warm = job(env_for("node-b"))
        print(f"[3/3] fresh job on node-b (empty caches, other path): bundle hit={warm['bundle_hit']} "
              f"({warm['pulled']}), {warm['hits']} hits, {warm['misses']} misses, "
              f"{warm['benchmark_runs']} benchmark runs, {warm['seconds']:.1f} s after imports; "
              f"autotuning time saved {warm['time_saved_s']:.2f} s")
        listing = subprocess.run([sys.executable, "-m", "bundler.cli", "ls", "--remote", remote],
                                 capture_output=True, text=True, env=os.environ)
        print("\n$ bundler ls\n" + listing.stdout.rstrip())
        ok = warm["bundle_hit"] and warm["benchmark_runs"] == 0 and warm["misses"] == 0
        print("\nOK: the fresh node autotuned nothing." if ok else "\nFAILED: the fresh node autotuned again.")
        return 0 if ok else 1
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
