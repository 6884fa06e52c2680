"""A thousand node starts against one ref, through an S3 endpoint that throttles like S3 does.

Everything runs on loopback: moto's S3 server, and in front of it a small proxy that answers
``503 SlowDown`` (S3's throttling error) to every request above ``--rate`` requests per second
(a one-second sliding window), as S3 does per prefix. Each node start is a fresh worker-side job
start: its own cache folder, its own S3 client (built, as a new process builds it), its own
store health and wait budget (``bundler.remote.health.reset()``), then the job path a compile
session takes on a hit: ``transfer.pull(ref=...)`` under ``health.guarded`` (the failure policy
every job-side store call goes through). Each node's endpoint carries its id as a path prefix
(``http://127.0.0.1:PORT/n17``), which the proxy strips, so every request is counted per node.

Nodes run in a pool of worker processes (``--workers`` at a time, each starting nodes one after
another), so there are always ``--workers`` nodes mid-start: the burst a fleet makes when a job
starts everywhere at once. Retries are botocore's ``standard`` mode (``BUNDLER_RETRY_MODE``):
jittered exponential backoff, ``rand(0, 1) * min(2 ** i, 20)`` seconds for throttling errors
(botocore/retries/standard.py, ``ExponentialBackoff.delay_amount``; SlowDown is in
``ThrottledRetryableChecker._THROTTLED_ERROR_CODES``), at most ``BUNDLER_MAX_ATTEMPTS`` (3) tries.

Checks (printed as PASS/FAIL): every node ends with the bundle or a clean miss within its budget;
a hit costs at most 3 requests; total requests at most 1.5x the successful ones; the run under
two minutes. Usage: ``python benchmarks/bench_fleet.py [--nodes 1000] [--rate 300] [--workers 24]``.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import http.server
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import cleanup, fake_aws_env, moto_s3, s3_client, scratch  # noqa: E402

BUCKET = "bench-fleet"
REF = "fleet-compile"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "proxy-connection",
    "upgrade",
    "content-length",
}


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A node that gave up closes its connection mid-request: expected, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class ThrottlingProxy:
    """Forwards to moto; above ``rate`` requests in the last second, answers 503 SlowDown instead.

    Records (node, method, status) for every request. Node ``seed`` (the push) is not throttled.
    """

    def __init__(self, upstream: str, rate: float) -> None:
        host, port = upstream.split("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.rate = rate
        self.log: list[tuple[str, str, int, float]] = []
        self._window: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.request_queue_size = 1024
        threading.Thread(target=self._server.serve_forever, name="fleet-proxy", daemon=True).start()

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{node}"

    def admit(self, node: str) -> bool:
        if node == "seed":
            return True
        now = time.monotonic()
        with self._lock:
            while self._window and now - self._window[0] >= 1.0:
                self._window.popleft()
            if len(self._window) >= self.rate:
                return False
            self._window.append(now)
            return True

    def record(self, node: str, method: str, status: int) -> None:
        with self._lock:
            self.log.append((node, method, status, time.monotonic()))

    def upstream_conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        return conn

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                _, node, rest = self.path.split("/", 2)
                if not proxy.admit(node):
                    proxy.record(node, self.command, 503)
                    xml = (
                        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                for attempt in (1, 2):  # a kept-alive upstream connection may have been closed
                    conn = proxy.upstream_conn()
                    try:
                        conn.request(self.command, "/" + rest, body=body or None, headers=headers)
                        response = conn.getresponse()
                        payload = response.read()
                        break
                    except (OSError, http.client.HTTPException):
                        conn.close()
                        proxy._local.conn = None
                        if attempt == 2:
                            raise
                proxy.record(node, self.command, response.status)
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


def store_url(endpoint: str) -> str:
    return f"s3://{BUCKET}/fleet?endpoint={endpoint}&addressing=path"


_SESSION = None


def _share_botocore_session() -> None:
    """One botocore session per worker process, so each node's new client skips re-reading the
    service models (~0.1-0.3 s of CPU per client here). A real node pays that once, on its own
    CPU; a simulation of a thousand on two cores cannot, and the requests are the same either way.
    """
    global _SESSION
    import logging

    import botocore.session

    if _SESSION is None:
        # A node that gives up on a throttled store warns once, as it should; a thousand of them
        # would bury the report, which counts those outcomes instead.
        logging.getLogger("bundler").setLevel(logging.ERROR)
        _SESSION = botocore.session.get_session()
        botocore.session.get_session = lambda env_vars=None: _SESSION


def node_start(args: tuple[int, str, str, float]) -> tuple[int, str, float]:
    """One node start, as a fresh job on a fresh machine: returns (node, outcome, seconds)."""
    _share_botocore_session()
    from bundler.config import Settings
    from bundler.remote import health, layout, transfer
    from bundler.stores import s3_client as clients

    node, endpoint, root, budget = args
    cache = Path(root) / f"n{node}"
    settings = Settings.from_env(remote=store_url(endpoint), cache_dir=cache, pull_budget=budget)
    health.reset()  # a new process: no opened store, no health history, the whole budget
    clients.clear_clients()
    start = time.monotonic()
    result = health.guarded(
        settings,
        "read",
        layout.ref_key(REF),
        lambda: transfer.pull(health.shared_store(settings), cache / "triton", ref=REF, settings=settings),
    )
    seconds = time.monotonic() - start
    outcome = (
        "hit"
        if result is not None
        else ("miss (store skipped)" if not health.remote_usable(settings, "read") else "miss")
    )
    shutil.rmtree(cache, ignore_errors=True)  # untimed: tmpfs holds a thousand caches otherwise
    return node, outcome, seconds


def pick_source(name: str) -> tuple[str, Path]:
    from corpus import extract_fixture, make_corpus

    if name != "synthetic":
        try:
            return f"real H200 {name}", extract_fixture(f"{name}.tar.gz", scratch(name))
        except FileNotFoundError:
            print(f"(fixture {name} not found; using a small synthetic cache)")
    root = scratch("small-synthetic")
    make_corpus(root, kernels=20, mean_kb=20)
    return "synthetic, 20 kernels", root


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument(
        "--rate", type=float, default=300, help="requests/s the endpoint serves before 503 SlowDown"
    )
    parser.add_argument("--workers", type=int, default=8, help="node starts in flight at any time")
    parser.add_argument(
        "--budget", type=float, default=30.0, help="each node's BUNDLER_PULL_BUDGET (seconds)"
    )
    parser.add_argument(
        "--corpus",
        default="default_caches",
        help="default_caches, triton_autotune_caches (real H200 fixtures) or synthetic",
    )
    args = parser.parse_args()
    os.environ.pop("BUNDLER_REMOTE", None)
    fake_aws_env()
    began = time.monotonic()
    print(
        f"bench_fleet: {os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"{args.nodes} node starts, {args.workers} in flight, endpoint throttled at {args.rate:g} requests/s, "
        f"budget {args.budget:g} s per node, retry mode {os.environ.get('BUNDLER_RETRY_MODE', 'standard')}, "
        f"max attempts {os.environ.get('BUNDLER_MAX_ATTEMPTS', '3')}",
        flush=True,
    )
    # Spawned (not forked) workers: the parent runs moto's and the proxy's threads.
    pool = multiprocessing.get_context("spawn").Pool(args.workers)
    try:
        with moto_s3() as moto:
            s3_client(moto).create_bucket(Bucket=BUCKET)
            proxy = ThrottlingProxy(moto, args.rate)
            try:
                return run(args, pool, proxy, began)
            finally:
                proxy.close()
    finally:
        pool.terminate()
        cleanup()


def run(
    args: argparse.Namespace, pool: multiprocessing.pool.Pool, proxy: ThrottlingProxy, began: float
) -> int:
    from bundler.config import Settings
    from bundler.keys import producer_facts
    from bundler.remote import transfer
    from bundler.stores import open_store

    label, source = pick_source(args.corpus)
    seed = Settings.from_env(remote=store_url(proxy.url("seed")))
    with open_store(seed.remote, seed) as store:
        pushed = transfer.push(store, source, ref=REF, settings=seed, producer=producer_facts())
    print(
        f"bundle: {label}, {len(pushed.manifest.files)} files, {pushed.manifest.total_size / 1e6:.1f} MB, "
        f"{pushed.size / 1e6:.2f} MB compressed; ref {REF} -> {pushed.digest[:12]}",
        flush=True,
    )
    root = scratch("nodes")
    pool.map(int, range(args.workers))  # workers started and idle before the clock starts
    list(
        pool.imap_unordered(
            node_start, [(-1 - i, proxy.url("warm"), str(root), args.budget) for i in range(args.workers)]
        )
    )  # imports done in every worker
    proxy.log.clear()
    fleet_start = time.monotonic()
    jobs = [(n, proxy.url(f"n{n}"), str(root), args.budget) for n in range(args.nodes)]
    results = list(pool.imap_unordered(node_start, jobs, chunksize=1))
    fleet_seconds = time.monotonic() - fleet_start
    return report(args, proxy, results, fleet_seconds, time.monotonic() - began)


def report(
    args: argparse.Namespace,
    proxy: ThrottlingProxy,
    results: list[tuple[int, str, float]],
    fleet_seconds: float,
    total_seconds: float,
) -> int:
    per_node: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    statuses: collections.Counter[int] = collections.Counter()
    methods: collections.Counter[str] = collections.Counter()
    for node, method, status, _ in proxy.log:
        if node.startswith("n"):
            per_node[node][status] += 1
            statuses[status] += 1
            methods[method] += 1
    outcomes = collections.Counter(outcome for _, outcome, _ in results)
    hits = [(n, s) for n, outcome, s in results if outcome == "hit"]
    total = sum(statuses.values())
    ok = total - statuses[503]
    requests_of = {n: sum(per_node[f"n{n}"].values()) for n, _, _ in results}
    per_hit = collections.Counter(requests_of[n] for n, _ in hits)
    successful_per_hit = collections.Counter(
        sum(c for status, c in per_node[f"n{n}"].items() if status != 503) for n, _ in hits
    )
    times = [s for _, _, s in results]
    print(
        f"\nfleet: {len(results)} node starts in {fleet_seconds:.1f} s "
        f"({len(results) / fleet_seconds:.0f} starts/s, {total / fleet_seconds:.0f} requests/s offered)"
    )
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(
        f"requests: {total} ({', '.join(f'{m} {c}' for m, c in sorted(methods.items()))}); by status: "
        + ", ".join(f"{s} x{c}" for s, c in sorted(statuses.items()))
        + f"; successful (not 503) {ok}; total / successful {total / max(ok, 1):.3f}"
    )
    print("\nrequests per hit start (all, 503s included)   | successful requests per hit start")
    for count in sorted(set(per_hit) | set(successful_per_hit)):
        print(
            f"  {count:2d} requests: {per_hit.get(count, 0):5d} nodes {'#' * (per_hit.get(count, 0) * 40 // max(len(hits), 1)):40s}"
            f" | {successful_per_hit.get(count, 0):5d} nodes"
        )
    print("\nstart time (seconds, from the first request to the bundle unpacked or the miss):")
    print("| outcome | nodes | p50 | p90 | p99 | max | mean |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, values in (("all", times), ("hit", [s for _, s in hits])):
        if values:
            print(
                f"| {name} | {len(values)} | {percentile(values, 50):.3f} | {percentile(values, 90):.3f} | "
                f"{percentile(values, 99):.3f} | {max(values):.3f} | {statistics.mean(values):.3f} |"
            )
    checks = [
        ("every node ends with the bundle or a clean miss", sum(outcomes.values()) == args.nodes),
        # guarded() stops waiting when the budget is spent; returning from there takes a moment.
        (
            f"every node within its budget ({args.budget:g} s, +0.5 s to return)",
            max(times) <= args.budget + 0.5,
        ),
        ("a hit costs at most 3 successful requests", max(successful_per_hit, default=0) <= 3),
        ("a hit costs at most 3 requests, 503s included", max(per_hit, default=0) <= 3),
        ("no retry storm: total <= 1.5x successful", total <= 1.5 * ok),
        ("whole run under two minutes", total_seconds < 120),
    ]
    print(
        f"\nwhole run {total_seconds:.1f} s; load at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for what, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {what}")
    return 0 if all(passed for _, passed in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
