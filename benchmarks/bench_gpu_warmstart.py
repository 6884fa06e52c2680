"""Warm start on a real GPU: a fresh process at a new cache path that pulls a bundle compiles nothing.

The product's main promise, measured end to end with real Triton kernels: an fp16 matmul autotuned
with ``bundler.integrations.triton.autotune`` over 20 configs and 3 shapes (the workload of
``shared/fixtures/README.md``). Every phase is a fresh process (this script re-invoked with
``--phase``) with its own ``TRITON_CACHE_DIR``, ``TRITON_HOME`` and ``BUNDLER_CACHE_DIR``, all
sharing one ``file://`` store:

========================  ====================================================================
cold                      empty caches, inside ``compile_session``: tunes, compiles, pushes
warm-same-path            plain ``triton.autotune(cache_results=True)``, the cold run's dirs
                          (what Triton alone gives on the node that compiled)
--- the cold run's Triton cache is now copied twice (``cp -r``) and its original directory is
    renamed away, as on another node where the original path does not exist ---
bundler-warm              NEW empty dirs at other paths, ``compile_session`` pulls the bundle
                          (``cache_results=True``, as in the cold run)
bundler-warm-no-cr        the same with ``cache_results=False``: only kernel-bundler's own
                          autotune records can skip the benchmarks
copied-cr                 plain ``triton.autotune(cache_results=True)`` on a ``cp -r`` copy
copied-no-cr              plain ``triton.autotune`` without ``cache_results`` on another copy
========================  ====================================================================

Measured per phase: seconds from the moment the parent starts the process to the first correct
result of all 3 shapes (interpreter start and the torch/triton imports included), benchmark calls
(``do_bench`` wrapped in a counter), kernel compilations and C launcher-stub builds (counted by a
cache manager that Triton routes every cache write through: one ``put_group`` per compiled kernel,
one ``put`` of a ``.so`` per stub built with the C compiler), and kernel-bundler's session hit and
time saved.

Usage (on a GPU machine; the repository root must be importable)::

    PYTHONPATH=. python benchmarks/bench_gpu_warmstart.py [--repeat 3] [--out DIR]
    PYTHONPATH=. python benchmarks/bench_gpu_warmstart.py --dry-run   # CPU, TRITON_INTERPRET=1

``--dry-run`` runs every phase on the Triton interpreter with tiny shapes and configs and a CPU
timer as the benchmark: no kernel is compiled there, but the orchestration, the session push and
pull and the autotune records are exercised.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]
T0_ENV = "BENCH_WARMSTART_T0"
RESULT_MARK = "BENCH_WARMSTART_RESULT "
PATCH_ENV = "BENCH_WARMSTART_PATCH_BACKEND_HASH"

# name -> (uses kernel-bundler, cache_results, which cache dirs)
PHASES: dict[str, tuple[bool, bool, str]] = {
    "cold-plain": (False, True, "cold-plain"),  # what a cold start costs without kernel-bundler
    "cold": (True, True, "cold"),
    "warm-same-path": (False, True, "cold"),
    "bundler-warm": (True, True, "bwarm"),
    "bundler-warm-no-cr": (True, False, "bwarm-nocr"),
    "copied-cr": (False, True, "copy-cr"),
    "copied-no-cr": (False, False, "copy-nocr"),
}

GPU_SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 512)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): 20 distinct candidates, all fit sm_90 shared memory.
GPU_CONFIGS = [
    (128, 256, 64, 8, 3),
    (64, 256, 32, 4, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 2, 5),
    (32, 64, 32, 2, 5),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 3),
    (256, 128, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 2, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 256, 32, 8, 4),
    (256, 64, 32, 8, 4),
    (32, 32, 64, 2, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 128, 8, 2),
]
DRY_SHAPES = [(32, 32, 32), (64, 32, 48), (48, 64, 32)]
DRY_CONFIGS = [(16, 16, 16, 4, 2), (32, 16, 16, 4, 2), (16, 32, 16, 4, 2), (32, 32, 16, 4, 2)]


@triton.jit
def matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(tl.float16), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# --- the child: one phase in a fresh process ------------------------------------------------------


class Counts:
    kernel_compiles = 0  # put_group of a kernel's metadata group: one per real compilation
    cubins_written = 0
    stub_builds = 0  # a C launcher / driver-utils module built with the C compiler
    stub_names: list[str] = []


def _install_counting_manager() -> None:
    """Route Triton's cache through a counting FileCacheManager (kernel-bundler wraps it later)."""
    from triton import knobs
    from triton.runtime.cache import FileCacheManager

    class CountingCacheManager(FileCacheManager):
        def put(self, data, filename, binary=True):  # noqa: ANN001, ANN202 - Triton's signature
            if filename.endswith(".cubin"):
                Counts.cubins_written += 1
            elif filename.endswith(".so") or filename.endswith(".pyd"):
                Counts.stub_builds += 1
                Counts.stub_names.append(filename)
            return super().put(data, filename, binary=binary)

        def put_group(self, filename, group):  # noqa: ANN001, ANN202
            Counts.kernel_compiles += 1
            return super().put_group(filename, group)

    knobs.cache.manager_class = CountingCacheManager


class CountingBench:
    """``do_bench`` with a call counter; on the interpreter a CPU timer of the same shape."""

    def __init__(self, interpret: bool) -> None:
        self.calls = 0
        self.interpret = interpret

    def __call__(self, fn, *args, **kwargs):  # noqa: ANN001, ANN204 - Triton's callback shape
        self.calls += 1
        if not self.interpret:
            return triton.testing.do_bench(fn, *args, **kwargs)
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return [ms, ms, ms]


def _configs(interpret: bool) -> list:
    table = DRY_CONFIGS if interpret else GPU_CONFIGS
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in table
    ]


def kernel_code(interpret: bool) -> str:
    """What names this compile: the kernel's source and its candidate list."""
    fn = getattr(matmul_kernel, "fn", matmul_kernel)
    table = DRY_CONFIGS if interpret else GPU_CONFIGS
    return inspect.getsource(fn) + f"\n# configs {table!r}\n"


def _versions(torch_mod) -> dict:  # noqa: ANN001
    facts = {"triton": triton.__version__, "torch": torch_mod.__version__, "python": sys.version.split()[0]}
    if torch_mod.cuda.is_available():
        facts["gpu"] = torch_mod.cuda.get_device_name(0)
        facts["cc"] = ".".join(map(str, torch_mod.cuda.get_device_capability(0)))
    else:
        facts["gpu"] = "none (CPU interpreter)"
    return facts


def _patch_backend_hash() -> None:
    """MONKEYPATCH (``--patch-backend-hash``, a proposed fix measured here, not bundler's code).

    ``bundler.keys.backend_hash`` asks ``driver.active.get_current_target()``, which initialises
    Triton's CUDA driver and so builds its ``cuda_utils`` C module with the C compiler, inside
    ``begin()``, before the session's recorder is attached and before the fetch starts: the module
    is neither bundled by the cold run nor found by the warm one. The same value, without the
    driver: the target from torch's device capability and the backend's own hash (ptxas version).
    """
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from bundler import keys

    def backend_hash() -> str:
        major, minor = torch.cuda.get_device_capability()
        target = GPUTarget("cuda", major * 10 + minor, 32)
        return f"{target.backend}-{target.arch}-{target.warp_size}-{make_backend(target).hash()}"

    keys.backend_hash = backend_hash


def run_phase(name: str) -> dict:
    """Runs in the child: build the kernel, run all shapes, check them, report counters."""
    import torch

    t_imports = time.time()
    uses_bundler, cache_results, _ = PHASES[name]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cpu" if interpret else "cuda"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    _install_counting_manager()
    bench = CountingBench(interpret)
    tune_args = {
        "configs": _configs(interpret),
        "key": ["M", "N", "K"],
        "do_bench": bench,
        "cache_results": cache_results,
    }
    if uses_bundler:
        from bundler.integrations import triton as bt

        kernel = bt.autotune(**tune_args)(matmul_kernel)
    else:
        kernel = triton.autotune(**tune_args)(matmul_kernel)

    result: dict = {
        "phase": name,
        "bundler": uses_bundler,
        "cache_results": cache_results,
        "triton_cache_dir": os.environ["TRITON_CACHE_DIR"],
    }
    result.update(_versions(torch))
    shapes = DRY_SHAPES if interpret else GPU_SHAPES
    gen = torch.Generator(device=device).manual_seed(int(time.time_ns() % (1 << 31)))

    def workload() -> None:
        winners, errors = [], []
        for m, n, k in shapes:
            a = torch.randn((m, k), device=device, dtype=torch.float16, generator=gen)
            b = torch.randn((k, n), device=device, dtype=torch.float16, generator=gen)
            c = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
            kernel[
                lambda meta, m=m, n=n: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            ](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
            ref = a.double() @ b.double()
            err = ((c.double() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:  # NaN fails too: every element must have been written
                raise AssertionError(f"shape {(m, n, k)}: relative error {err}")
            errors.append(err)
            best = kernel.best_config
            winners.append(
                [
                    best.kwargs["BLOCK_M"],
                    best.kwargs["BLOCK_N"],
                    best.kwargs["BLOCK_K"],
                    best.num_warps,
                    best.num_stages,
                ]
            )
        if device == "cuda":
            torch.cuda.synchronize()
        result["winners"] = winners
        result["max_rel_err"] = max(errors)

    if uses_bundler:
        import bundler
        from bundler import autotune

        if os.environ.get(PATCH_ENV) == "1" and not interpret:
            _patch_backend_hash()
            result["patched_backend_hash"] = True
        t_begin = time.time()
        with bundler.compile_session(code=kernel_code(interpret)) as session:
            workload()
            result["seconds"] = time.time() - float(os.environ[T0_ENV])
            result["session_hit"] = session.hit
            result["time_saved_s"] = session.time_saved_ns / 1e9
            result["pulled_files"] = len(session.pulled.manifest.files) if session.pulled else 0
        result["end_compile_s"] = time.time() - float(os.environ[T0_ENV]) - result["seconds"]
        result["session_s"] = time.time() - t_begin
        if session.pushed is not None:
            result["pushed"] = {
                "digest": session.pushed.digest[:16],
                "bytes": session.pushed.size,
                "files": len(session.pushed.manifest.files),
            }
        stats = autotune.stats()
        result["records"] = {"hits": stats.hits, "misses": stats.misses, "saves": stats.saves}
    else:
        workload()
        result["seconds"] = time.time() - float(os.environ[T0_ENV])

    result["import_s"] = t_imports - float(os.environ[T0_ENV])
    result["bench_calls"] = bench.calls
    result["kernel_compiles"] = Counts.kernel_compiles
    result["cubins_written"] = Counts.cubins_written
    result["stub_builds"] = Counts.stub_builds
    result["stub_names"] = Counts.stub_names
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    result["cubins_present"] = sum(1 for _ in cache.rglob("*.cubin")) if cache.is_dir() else 0
    return result


# --- the parent: phases in order, then the table -----------------------------------------------------


def _phase_env(root: Path, dirs: str, store: Path, dry_run: bool, patch: bool) -> dict[str, str]:
    env = dict(os.environ)
    for var in list(env):
        if var.startswith(("BUNDLER_", "TRITON_")):
            del env[var]
    env.update(
        {
            "TRITON_CACHE_DIR": str(root / dirs / "triton-cache"),
            "TRITON_HOME": str(root / dirs / "triton-home"),
            "BUNDLER_CACHE_DIR": str(root / dirs / "bundler-cache"),
            "BUNDLER_REMOTE": store.as_uri(),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    if patch:
        env[PATCH_ENV] = "1"
    return env


def spawn(name: str, root: Path, store: Path, args: argparse.Namespace, log: Path | None) -> dict:
    env = _phase_env(root, PHASES[name][2], store, args.dry_run, args.patch_backend_hash)
    env[T0_ENV] = repr(time.time())
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--phase", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=args.phase_timeout,
        check=False,
    )
    wall = time.time() - t0
    if log is not None:
        with log.open("a") as f:
            f.write(f"===== {name} (rc {proc.returncode}, {wall:.2f} s) {env['TRITON_CACHE_DIR']}\n")
            f.write(proc.stdout)
            f.write(proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        print(
            f"!! phase {name} failed (rc {proc.returncode}); its stderr ends:\n{proc.stderr[-4000:]}",
            flush=True,
        )
        return {"phase": name, "failed": True, "wall_s": wall}
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    result["wall_s"] = wall
    return result


def run_all(root: Path, args: argparse.Namespace, log: Path | None) -> list[dict]:
    store = root / "store"
    store.mkdir(parents=True)
    results = []

    def phase(name: str) -> None:
        if name not in args.phases:
            return
        result = spawn(name, root, store, args, log)
        results.append(result)
        print(f"   {name}: {json.dumps(result)}", flush=True)

    phase("cold-plain")
    phase("cold")
    phase("warm-same-path")
    # Another node: copies of the cold cache at other paths; the original path no longer exists.
    cold = root / "cold" / "triton-cache"
    for dirs in ("copy-cr", "copy-nocr"):
        (root / dirs).mkdir()
        if cold.is_dir():
            subprocess.run(["cp", "-r", str(cold), str(root / dirs / "triton-cache")], check=True)
    if cold.is_dir():
        cold.rename(root / "cold" / "triton-cache.moved-away")
    for name in ("bundler-warm", "bundler-warm-no-cr", "copied-cr", "copied-no-cr"):
        phase(name)
    store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    print(
        f"   store: {sum(1 for p in store.rglob('*') if p.is_file())} objects, {store_bytes} bytes",
        flush=True,
    )
    return results


def _cell(result: dict, key: str, fmt: str = "{}") -> str:
    value = result.get(key)
    return "-" if value is None else fmt.format(value)


def table(runs: list[list[dict]]) -> str:
    """Markdown table: the median seconds over runs, counters of the last run (they do not vary)."""
    head = (
        "| phase | Triton cache dir | s to first result (median) | runs | benchmark calls | kernel "
        "compiles | stub builds | session | bundler records hit/miss | time saved (s) |"
    )
    rows = [head, "|" + " --- |" * 10]
    for name in PHASES:
        mine = [r for run in runs for r in run if r.get("phase") == name]
        if not mine:
            continue
        ok = [r for r in mine if not r.get("failed")]
        if not ok:
            rows.append(f"| {name} | FAILED | | {len(mine)} | | | | | | |")
            continue
        last = ok[-1]
        secs = statistics.median(r["seconds"] for r in ok)
        spread = (
            f" ({min(r['seconds'] for r in ok):.2f}-{max(r['seconds'] for r in ok):.2f})"
            if len(ok) > 1
            else ""
        )
        session = "-" if not last["bundler"] else ("hit" if last.get("session_hit") else "miss")
        records = last.get("records")
        hits = "-" if records is None else f"{records['hits']}/{records['misses']}"
        rows.append(
            f"| {name} | {PHASES[name][2]} | {secs:.2f}{spread} | {len(ok)} | {last['bench_calls']} | "
            f"{last['kernel_compiles']} | {last['stub_builds']} | {session} | {hits} | "
            f"{_cell(last, 'time_saved_s', '{:.2f}')} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=list(PHASES), help="(internal) run one phase in this process")
    parser.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes and configs")
    parser.add_argument(
        "--repeat", type=int, default=1, help="whole sequences to run (new dirs and store each)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the log and results.json")
    parser.add_argument("--scratch", default=None, help="parent folder of the temporary cache dirs")
    parser.add_argument("--phase-timeout", type=float, default=300.0)
    parser.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated subset, in the usual order"
    )
    parser.add_argument(
        "--patch-backend-hash",
        action="store_true",
        help="MONKEYPATCH bundler.keys.backend_hash to skip Triton's driver init (a proposed fix)",
    )
    parser.add_argument("--tag", default="", help="suffix for results.json/table.md/phases.log names")
    args = parser.parse_args()
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {sorted(unknown)}")

    if args.phase:
        print(RESULT_MARK + json.dumps(run_phase(args.phase)), flush=True)
        return

    out = Path(args.out) if args.out else None
    log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log = out / f"phases{args.tag}.log"
        log.write_text("")
    runs: list[list[dict]] = []
    for i in range(args.repeat):
        root = Path(tempfile.mkdtemp(prefix=f"warmstart-{i}-", dir=args.scratch))
        print(f"== sequence {i + 1}/{args.repeat} under {root}", flush=True)
        try:
            runs.append(run_all(root, args, log))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if out is not None:
            (out / f"results{args.tag}.json").write_text(json.dumps(runs, indent=1))
    facts = next((r for run in runs for r in run if "triton" in r), {})
    print(
        f"\nGPU: {facts.get('gpu')} (cc {facts.get('cc')}); triton {facts.get('triton')}; "
        f"torch {facts.get('torch')}; python {facts.get('python')}; "
        f"{'DRY RUN (TRITON_INTERPRET=1)' if args.dry_run else 'real GPU kernels'}"
        f"{'; MONKEYPATCHED bundler.keys.backend_hash (proposed fix)' if args.patch_backend_hash else ''}"
    )
    winners = {r["phase"]: r.get("winners") for r in runs[-1] if not r.get("failed")}
    print(f"winners (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per shape, last run: {json.dumps(winners)}")
    print(table(runs))
    if out is not None:
        (out / f"table{args.tag}.md").write_text(table(runs) + "\n")


if __name__ == "__main__":
    main()
