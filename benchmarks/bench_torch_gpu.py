"""torch.compile max-autotune on a GPU: cold, warm-local and warm-from-bundle at another path.

Every phase is a fresh process (this script re-invoked with ``--phase``), so nothing carries over
in memory. The store is a ``file://`` folder (the GPU machine has no S3 server; the transfer path
is the same code). Phases, per round:

1. ``cold``: empty caches in folder A; the job compiles and autotunes inside
   ``bundler.integrations.torch.compile_cache`` and pushes the bundle;
2. ``warm-local``: folder A again, no store: what a second run on the same node gets;
3. ``warm-from-bundle``: folder A renamed away, empty caches in folder B; the session pulls the
   bundle before the first compile, then the job runs.

Reported per phase: time to the first result (forward + backward of a small transformer block
stack, compile included; for the bundle phase the session's begin is counted in), and PyTorch's
own counters: FX graph and AOTAutograd cache hits and misses, autotune benchmarks
(``select_algorithm_*``, ``coordesc_tuning_bench``, ``benchmarking.*``) and Triton compiles.

``--cold-plain`` adds a phase 0 per round, the same job with empty caches and no session, and
reports what the cold session cost: cold (its begin and end counted in) / cold-plain. ``--s3``
serves the store from moto's S3 server on 127.0.0.1 in this process instead of a folder, so the
session pays what it pays against a bucket (botocore's import and client, HTTP).

Run: ``python benchmarks/bench_torch_gpu.py [--rounds 2] [--blocks 4] [--dim 512] [--cold-plain] [--s3]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def job(args: argparse.Namespace) -> dict:
    """One phase in this fresh process: compile, run one step, report the counters."""
    t_import = time.perf_counter()
    import torch
    from torch._dynamo.utils import counters

    import_s = time.perf_counter() - t_import
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    for name in ("torch._inductor.codecache", "torch._inductor.runtime.autotune_cache",
                 "torch._functorch._aot_autograd.autograd_cache"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
    lookups = _trace_best_config_lookups()
    tuned = _trace_tuning()
    torch.manual_seed(0)
    if args.model == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(args.dim, 4 * args.dim), torch.nn.GELU(),
                                    torch.nn.Linear(4 * args.dim, args.dim)).to("cuda", torch.bfloat16)
    else:
        layer = torch.nn.TransformerEncoderLayer(args.dim, nhead=8, dim_feedforward=4 * args.dim,
                                                 batch_first=True, dtype=torch.bfloat16, device="cuda")
        model = torch.nn.TransformerEncoder(layer, num_layers=args.blocks, enable_nested_tensor=False)
    x = torch.randn(8, 256, args.dim, dtype=torch.bfloat16, device="cuda")

    def step() -> float:
        compiled = torch.compile(model, mode=args.mode)
        out = compiled(x)
        out.float().sum().backward()
        torch.cuda.synchronize()
        return float(out.float().sum())

    summary, status, added = None, None, {}
    t0 = time.perf_counter()
    if args.store:
        from bundler.integrations import torch as bt

        session = bt.compile_cache(args.store, ref="gpu-bench", strict=None)
        if args.profile_begin:  # where the session's synchronous begin goes, in this phase's stderr
            import cProfile
            import pstats

            profile = cProfile.Profile()
            profile.runcall(session.begin)
            pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(60)
        with session:
            begin_s = time.perf_counter() - t0
            value = step()
            t_step = time.perf_counter()
        end_s = time.perf_counter() - t_step
        summary, status = session.summary_line(), session.status
        print(f"session fetch timings: {session.timings}", file=sys.stderr, flush=True)
        added = {layer: names[:12] + ([f"... {len(names)} in all"] if len(names) > 12 else [])
                 for layer, names in session._added_files().items() if names}
        first_result_s = t_step - t0
    else:
        begin_s = end_s = 0.0
        value = step()
        first_result_s = time.perf_counter() - t0
    inductor = dict(counters["inductor"])
    return {
        "value": value, "import_s": round(import_s, 2), "begin_s": round(begin_s, 2),
        "first_result_s": round(first_result_s, 2), "end_s": round(end_s, 2), "status": status, "summary": summary,
        "fx_miss": inductor.get("fxgraph_cache_miss", 0), "fx_hit": inductor.get("fxgraph_cache_hit", 0),
        "aot_miss": counters["aot_autograd"].get("autograd_cache_miss", 0),
        "aot_hit": counters["aot_autograd"].get("autograd_cache_hit", 0),
        "autotune": {k: v for k, v in inductor.items() if "autotune" in k or "bench" in k},
        "inductor_counters": inductor,
        "tuned": tuned,
        "retuned": sorted({t[1] for t in tuned if t[0] == "autotune_to_one_config" or "TEMPLATE" not in t[5]}),
        "best_configs": _best_configs(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])),
        "benchmarking": dict(counters["benchmarking"]),
        "triton_compiles": inductor.get("async_compile_cache_miss", 0),
        "added": added,
        "best_config_lookups": lookups,
    }


def _trace_best_config_lookups() -> list:
    """Record where Inductor looks for each kernel's ``.best_config`` and whether it was there."""
    from torch._inductor.runtime import autotune_cache

    seen: list = []
    real_read, real_save = autotune_cache.AutotuneCache._read, autotune_cache.AutotuneCache.save

    def read(self):  # noqa: ANN001, ANN202
        key = self.local_cache[1] if self.local_cache else None
        found = real_read(self)
        seen.append(["read", key, bool(key and os.path.exists(key)), found is not None])
        return found

    def save(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
        seen.append(["save", self.local_cache[1] if self.local_cache else None])
        return real_save(self, *a, **k)

    autotune_cache.AutotuneCache._read, autotune_cache.AutotuneCache.save = read, save
    return seen


def _trace_tuning() -> list:
    """Record every kernel Inductor benchmarks at run time (all configs, or coordinate descent)."""
    from torch._inductor.runtime import triton_heuristics

    seen: list = []
    cls = triton_heuristics.CachingAutotuner
    for name in ("autotune_to_one_config", "coordinate_descent_tuning"):
        real = getattr(cls, name, None)
        if real is None:
            continue

        def wrapped(self, *a, _real=real, _name=name, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            seen.append([_name, getattr(self.fn, "__name__", "?"), os.path.basename(self.filename or ""),
                         len(self.configs or []), type(self).__name__,
                         str(getattr(self, "heuristic_type", ""))])
            return _real(self, *a, **k)

        setattr(cls, name, wrapped)
    return seen


def _best_configs(root: Path) -> dict:
    """Every ``.best_config`` under the Inductor cache: relative path -> its JSON."""
    found = {}
    for path in root.rglob("*.best_config"):
        try:
            found[str(path.relative_to(root))] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            found[str(path.relative_to(root))] = repr(exc)
    return found


def run_phase(phase: str, root: Path, store: str | None, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUNDLER_", "TORCHINDUCTOR_", "TRITON_"))}
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(TMPDIR=str(root / "tmp"), TORCHINDUCTOR_CACHE_DIR=str(root / "inductor"),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               BUNDLER_CACHE_DIR=str(root / "bundler"), BUNDLER_PULL_BUDGET="120")
    cmd = [sys.executable, __file__, "--phase", phase, "--blocks", str(args.blocks), "--dim", str(args.dim),
           "--model", args.model, "--mode", args.mode] + (["--profile-begin"] if args.profile_begin else [])
    if store:
        cmd += ["--store", store]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if os.environ.get("BENCH_OUT"):
        out = Path(os.environ["BENCH_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{root.name}-{phase}.stderr").write_text(proc.stderr[-2_000_000:])
    reports = [line for line in proc.stdout.splitlines() if line.startswith("PHASE-REPORT ")]
    if proc.returncode or not reports:
        raise SystemExit(f"{phase} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(reports[-1][len("PHASE-REPORT "):])
    report["bundler_log"] = [line for line in proc.stderr.splitlines() if "bundler" in line][-6:]
    report["fetch_timings"] = next((line for line in proc.stderr.splitlines()
                                    if line.startswith("session fetch timings")), None)
    return report


def _tree(root: Path) -> list[str]:
    """Every file under ``root`` as a path relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _files_naming(root: Path, needle: str) -> list[str]:
    """Files under ``root`` whose bytes contain ``needle`` (an absolute path relocation missed)."""
    found = []
    raw = needle.encode()
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and raw in path.read_bytes():
                found.append(str(path.relative_to(root)))
        except OSError:
            continue
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm-repeat", type=int, default=1,
                        help="warm-local and warm-from-bundle runs per cold run (each in a fresh process; "
                             "0: only the cold phases)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--model", choices=["transformer", "mlp"], default="transformer")
    parser.add_argument("--mode", default="max-autotune-no-cudagraphs",
                        help="torch.compile mode; 'default' does no autotuning, so a cold compile's own "
                             "spread is small enough to see a few percent of session cost")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help="also write every phase's report to this file")
    parser.add_argument("--cold-plain", action="store_true",
                        help="also run each round's job cold without a session, and report the session's cost")
    parser.add_argument("--s3", action="store_true", help="a moto S3 server on loopback as the store")
    parser.add_argument("--profile-begin", action="store_true",
                        help="cProfile the session's begin in every phase with a store (into its stderr)")
    args = parser.parse_args()
    if args.phase:
        print("PHASE-REPORT " + json.dumps(job(args), default=str), flush=True)
        return

    with contextlib.ExitStack() as stack:
        bucket = _s3_bucket(stack) if args.s3 else None
        _rounds(args, bucket)


def _s3_bucket(stack: contextlib.ExitStack) -> str:
    """A fresh bucket on moto's server (started here, stopped with ``stack``): its store URL stem."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import moto_s3, s3_client

    endpoint = stack.enter_context(moto_s3())
    s3_client(endpoint).create_bucket(Bucket="gpu-bench")
    return f"s3://gpu-bench/{{}}?endpoint={endpoint}&addressing=path"


def _rounds(args: argparse.Namespace, bucket: str | None) -> None:
    import torch

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.blocks} encoder blocks, "
          f"d={args.dim}, bf16, batch 8 x 256, {args.mode}, fwd+bwd", flush=True)
    rows: dict[str, list[dict]] = {"cold-plain": [], "cold": [], "warm-local": [], "warm-from-bundle": []}
    base = Path(tempfile.mkdtemp(prefix="bundler-gpu-bench-"))
    for n in range(args.rounds):
        store = bucket.format(f"r{n}") if bucket else (base / f"store{n}").as_uri()
        here = base / f"r{n}-a"
        if args.cold_plain:
            rows["cold-plain"].append(run_phase("cold-plain", base / f"r{n}-plain", None, args))
            shutil.rmtree(base / f"r{n}-plain", ignore_errors=True)
        rows["cold"].append(run_phase("cold", here, store, args))
        for _ in range(args.warm_repeat):
            rows["warm-local"].append(run_phase("warm-local", here, None, args))
        files_a = _tree(here)
        here.rename(base / f"r{n}-a.away")
        for k in range(args.warm_repeat):
            there = base / f"r{n}-b{k}"
            rows["warm-from-bundle"].append(run_phase("warm-from-bundle", there, store, args))
            stale = _files_naming(there, str(here))
            new_files = sorted(set(_tree(there)) - set(files_a))
            print(f"  files at the new path that the producer's folder did not have: {len(new_files)} "
                  f"{new_files[:40]}", flush=True)
            print(f"  files at the new path still naming the producer's path: {len(stale)} {stale[:8]}", flush=True)
            if os.environ.get("BENCH_OUT"):
                Path(os.environ["BENCH_OUT"], f"r{n}-{k}-trees.json").write_text(
                    json.dumps({"producer": files_a, "fresh": _tree(there), "new": new_files}, indent=0))
        if args.warm_repeat:
            print(f"  files the bundle phase added: {rows['warm-from-bundle'][-1]['added']}", flush=True)
        for name in rows:
            for r in rows[name][-(1 if name.startswith("cold") else args.warm_repeat):]:
                print(f"round {n} {name:17} first result {r['first_result_s']:7.2f} s (begin {r['begin_s']:.2f}, "
                      f"end {r['end_s']:.2f}) "
                      f"fx {r['fx_hit']}h/{r['fx_miss']}m aot {r['aot_hit']}h/{r['aot_miss']}m "
                      f"re-tuned kernels {len(r['retuned'])} coordesc_tuning_bench "
                      f"{r['autotune'].get('coordesc_tuning_bench', 0)} status {r['status']}", flush=True)
                if r.get("fetch_timings"):
                    print(f"    {r['fetch_timings']}", flush=True)
        if args.warm_repeat:
            print(f"  bundle summary: {rows['warm-from-bundle'][-1]['summary']}", flush=True)
        else:
            print(f"  cold summary: {rows['cold'][-1]['summary']}", flush=True)
        shutil.rmtree(base / f"r{n}-a.away", ignore_errors=True)
    print("\n| phase | first result, s (median; all runs) | FX misses | AOT misses | kernels re-tuned | "
          "coordesc_tuning_bench |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, reps in rows.items():
        if not reps:
            continue
        times = [r["first_result_s"] for r in reps]
        print(f"| {name} | {statistics.median(times):.2f} ({', '.join(f'{t:.2f}' for t in times)}) | "
              f"{[r['fx_miss'] for r in reps]} | {[r['aot_miss'] for r in reps]} | "
              f"{[len(r['retuned']) for r in reps]} | "
              f"{[r['autotune'].get('coordesc_tuning_bench', 0) for r in reps]} |")
    if args.warm_repeat:
        local = statistics.median(r["first_result_s"] for r in rows["warm-local"])
        bundle = statistics.median(r["first_result_s"] for r in rows["warm-from-bundle"])
        print(f"\nwarm-from-bundle / warm-local = {bundle / local:.2f}x; "
              f"cold / warm-from-bundle = {statistics.median(r['first_result_s'] for r in rows['cold']) / bundle:.1f}x")
    if rows["cold-plain"]:
        costs = [(c["first_result_s"] + c["end_s"]) / p["first_result_s"]  # first result counts begin
                 for c, p in zip(rows["cold"], rows["cold-plain"], strict=True)]
        print(f"cold session incl. begin and end / cold-plain, every round: {', '.join(f'{c:.3f}x' for c in costs)}")
    if os.environ.get("BENCH_OUT") and not args.json_out:
        args.json_out = str(Path(os.environ["BENCH_OUT"], "rows.json"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1, default=str))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
