"""One "job" for the integration tests: autotune add_kernel in the Triton interpreter.

Runs in a fresh process (TRITON_INTERPRET must be set before Triton is imported, and a fresh
process is what a new node is). Settings come from the environment (BUNDLER_*, TRITON_CACHE_DIR).
Each ``--phase`` builds a new autotuner so in-memory results never carry over; a phase may
pretend to be another Triton version or backend, to prove those change the key. Prints one JSON
line: per-phase benchmark calls and winners, the cache statistics and the session outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import torch  # noqa: E402
import triton  # noqa: E402

import bundler  # noqa: E402
from bundler import autotune, keys  # noqa: E402
from bundler.integrations import triton as bt  # noqa: E402

import triton_kernels as tk  # noqa: E402

SIZES = (100, 300)


def run_phase(spec: str) -> dict:
    """spec: ``configs=base,triton=3.6.0,backend=cuda-90`` (every part optional)."""
    opts = dict(part.split("=", 1) for part in spec.split(",") if part)
    keys.triton_version = (lambda v=opts["triton"]: v) if "triton" in opts else _real_version
    keys.backend_hash = (lambda v=opts["backend"]: v) if "backend" in opts else _real_backend
    bench = tk.CountingBench()
    kernel = bt.autotune(configs=tk.configs(opts.get("configs", "base")), key=["n"], do_bench=bench)(tk.add_kernel)
    winners = []
    for n in SIZES:
        x, y, out = torch.rand(n), torch.rand(n), torch.empty(n)
        kernel[lambda meta, n=n: (triton.cdiv(n, meta["BLOCK"]),)](x, y, out, n)
        assert torch.allclose(out, x + y)
        winners.append(kernel.best_config.kwargs)
    return {"spec": spec, "bench_calls": bench.calls, "winners": winners}


_real_version, _real_backend = keys.triton_version, keys.backend_hash


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", action="append", default=[])
    parser.add_argument("--session", action="store_true", help="run the phases inside a compile session")
    args = parser.parse_args()
    result: dict = {}
    if args.session:
        with open(tk.__file__) as f:
            code = f.read()
        with bundler.compile_session(code=code) as session:
            session.sync()
            result["session_hit"] = session.hit
            result["time_saved_ns"] = session.time_saved_ns
            result["phases"] = [run_phase(spec) for spec in args.phase or [""]]
        result["pushed"] = session.pushed.digest if session.pushed else None
    else:
        result["phases"] = [run_phase(spec) for spec in args.phase or [""]]
    stats = autotune.stats()
    result["stats"] = {"hits": stats.hits, "misses": stats.misses, "saves": stats.saves,
                       "time_saved_ns": stats.time_saved_ns}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
