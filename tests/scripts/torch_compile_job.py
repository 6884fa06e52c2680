"""A tiny torch.compile job run in a fresh process by the torch integration tests and benchmark.

It compiles a small MLP (forward and backward, CPU, Inductor's C++ backend), runs one training
step and prints one JSON line: the first-call time, PyTorch's own cache counters and the number
of C++ builds this process ran. With ``--bundle URL`` the step runs inside
``bundler.integrations.torch.compile_cache`` so the caches come from (and go to) that store.

Usage: python torch_compile_job.py [--bundle URL] [--tag TAG] [--strict] [--width N] [--dry] [--no-push]
       [--hold-fetch] [--remote-cache URL]

``--hold-fetch`` makes the bundle download wait until the session's gate holds the first compile
for it, so the compile provably starts before the bundle is in place: it hits only if the gate
works. The precompiled-header bundle's download likewise waits until Inductor's header build is
held for it: the job builds no header only if that second gate works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default=None, help="store URL; omit for a plain compile")
    parser.add_argument("--ref", default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dry", action="store_true", help="begin and end a session without compiling")
    parser.add_argument("--no-push", action="store_true")
    parser.add_argument("--hold-fetch", action="store_true",
                        help="the bundle download waits until the first compile is held for it")
    parser.add_argument("--remote-cache", default=None,
                        help="store URL: serve Inductor's remote caches from it (torch_remote.install)")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("bundler").setLevel(logging.INFO)
    t_import = time.perf_counter()
    import torch
    import torch._inductor.cpp_builder as cpp_builder
    from torch._dynamo.utils import counters

    import_s = time.perf_counter() - t_import

    builds: list[str] = []
    real_build = cpp_builder.CppBuilder.build

    def counting_build(self):  # count every C++ compiler run in this process
        builds.append(os.path.basename(self.get_target_file_path()))
        return real_build(self)

    cpp_builder.CppBuilder.build = counting_build

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.LayerNorm(args.width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers)
    x = torch.randn(8, args.width)

    def step() -> float:
        compiled = torch.compile(model)
        out = compiled(x)
        out.sum().backward()
        return float(out.detach().double().sum())

    remote_installed = None
    if args.remote_cache is not None:
        os.environ["BUNDLER_REMOTE"] = args.remote_cache
        from bundler.integrations import torch_remote

        remote_installed = torch_remote.install()

    summary = None
    session_info: dict = {}
    t0 = time.perf_counter()
    if args.bundle is not None:
        from bundler.integrations import torch as bt

        store, gate_held, header_held = _held_store(args.bundle) if args.hold_fetch else (None, None, None)
        with bt.CompileCache(args.bundle, ref=args.ref, tag=args.tag, strict=args.strict or None,
                             push=not args.no_push, store=store) as session:
            t1 = time.perf_counter()
            begin_s = t1 - t0
            value = 0.0 if args.dry else step()
            first_call_s = time.perf_counter() - t1
            t2 = time.perf_counter()
        end_s = time.perf_counter() - t2  # the session's end: snapshot, pack and push after a miss
        summary = session.summary_line()
        session_info = {"status": session.status, "ref": session.ref, "reason": session.reason,
                        "explanation": session.explanation, "facts": session.facts,
                        "gate_held": gate_held.is_set() if gate_held is not None else None,
                        "header_gate_held": header_held.is_set() if header_held is not None else None}
    else:
        value = step()
        first_call_s = time.perf_counter() - t0
        begin_s = end_s = 0.0
    total_s = time.perf_counter() - t0

    report = {
        "value": value,
        "import_s": round(import_s, 3),
        "begin_s": round(begin_s, 3),
        "first_call_s": round(first_call_s, 3),
        "end_s": round(end_s, 3),
        "total_s": round(total_s, 3),
        # CPU of this process's own threads (not the compiler children): what a session adds
        # shows here with far less noise than in wall time on a shared machine.
        "cpu_self_s": round(_cpu_self_s(), 3),
        "cpu_main_s": round(time.thread_time(), 3),  # this (the job's) thread alone
        # The session reads through a helper process: a job that pushed nothing never loads botocore.
        "botocore_imported": "botocore" in sys.modules,
        "cpp_builds": builds,
        "inductor": dict(counters["inductor"]),
        "aot_autograd": dict(counters["aot_autograd"]),
        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "summary": summary,
        "remote_installed": remote_installed,
        "remote_cache_stats": _remote_stats(),
        "session": session_info,
    }
    print("JOB-REPORT " + json.dumps(report, sort_keys=True, default=str))
    return 0


def _held_store(url: str):  # noqa: ANN202
    """The real store, whose first bundle read starts only once the gate holds a compile, and the
    second (the precompiled headers) once the header build is held (or each after 60 s)."""
    import logging
    import threading

    from bundler.stores import open_store

    held, header_held = threading.Event(), threading.Event()

    class _GateWatcher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "first compile waits for" in record.getMessage():
                held.set()
            if "precompiled header build waits for" in record.getMessage():
                header_held.set()

    logging.getLogger("bundler.integrations.torch_gate").addHandler(_GateWatcher())
    store = open_store(url)
    real_open_read = store.open_read
    reads = []

    def open_read(key: str, **kwargs):  # noqa: ANN202
        if "/bundles/" in key:
            reads.append(key)
            (held if len(reads) == 1 else header_held).wait(60)
        return real_open_read(key, **kwargs)

    store.open_read = open_read
    return store, held, header_held


def _cpu_self_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _remote_stats() -> dict:
    from torch._inductor.remote_cache import cache_stats

    return {name: str(stat) for name, stat in cache_stats._stats.items()}


if __name__ == "__main__":
    sys.exit(main())
