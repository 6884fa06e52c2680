"""One training-job start: autotune two Triton kernels inside a kernel-bundler compile session.

Runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1), so it needs no GPU; on a GPU
drop that line and the custom ``do_bench`` and the same code caches real kernels. Settings come
from the environment (BUNDLER_REMOTE, BUNDLER_CACHE_DIR, TRITON_CACHE_DIR), as in a real job.
Prints one JSON line for demo.py to report. ``--quick`` runs one kernel at one shape (what the
tests of the journeys and examples run, many times over).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import bundler  # noqa: E402
from bundler import autotune  # noqa: E402
from bundler.integrations import triton as bt  # noqa: E402

BENCH_RUNS = 0


def cpu_bench(fn, quantiles=None):  # noqa: ANN001, ANN201 - Triton's do_bench callback shape
    """Times a kernel on the CPU (Triton's default timer needs a GPU); counts every benchmark."""
    global BENCH_RUNS
    BENCH_RUNS += 1
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        fn()
    ms = (time.perf_counter() - start) * 1e3 / 3
    return [ms, ms, ms]


BLOCKS = [triton.Config({"BLOCK": b}, num_warps=w) for b in (32, 64, 128, 256) for w in (2, 4)]


@bt.autotune(configs=BLOCKS, key=["n"], do_bench=cpu_bench)
@triton.jit
def scaled_add(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


@bt.autotune(configs=BLOCKS, key=["n_cols"], do_bench=cpu_bench)
@triton.jit
def row_scale(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        v = tl.load(x_ptr + row * n_cols + offs, mask=mask)
        tl.store(out_ptr + row * n_cols + offs, v * 0.5, mask=mask)


def model_step(quick: bool = False) -> None:
    if quick:  # one kernel, one shape, two configs tuned: the journeys' tests run it many times
        x, y, out = torch.rand(256), torch.rand(256), torch.empty(256)
        scaled_add[lambda m: (triton.cdiv(256, m["BLOCK"]),)](x, y, out, 2.0, 256)
        assert torch.allclose(out, 2.0 * x + y)
        return
    for n in (1000, 4000, 16000):
        x, y, out = torch.rand(n), torch.rand(n), torch.empty(n)
        scaled_add[lambda m, n=n: (triton.cdiv(n, m["BLOCK"]),)](x, y, out, 2.0, n)
        assert torch.allclose(out, 2.0 * x + y)
    for cols in (100, 700):
        x = torch.rand(8, cols)
        out = torch.empty_like(x)
        row_scale[(8,)](x, out, cols)
        assert torch.allclose(out, x * 0.5)


def main() -> None:
    start = time.perf_counter()
    with open(__file__) as f:
        source = f.read()
    with bundler.compile_session(code=source) as session:
        model_step(quick="--quick" in sys.argv)
        hit = session.hit
    stats = autotune.stats()
    print(json.dumps({
        "seconds": time.perf_counter() - start,
        "bundle_hit": hit,
        "pulled": session.pulled.digest if session.pulled else None,
        "pushed": session.pushed.digest if session.pushed else None,
        "benchmark_runs": BENCH_RUNS,
        "hits": stats.hits,
        "misses": stats.misses,
        "time_saved_s": max(stats.time_saved_ns, session.time_saved_ns) / 1e9,
    }))


if __name__ == "__main__":
    main()
