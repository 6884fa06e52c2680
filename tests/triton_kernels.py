"""Triton kernels and a counting CPU benchmark for the integration tests.

Importing this module imports Triton, so set ``TRITON_INTERPRET=1`` first when the kernels are to
run on the CPU (the subprocess scripts do). ``add_kernel`` is the plain ``@triton.jit`` function;
each test wraps it in its own autotuner so the in-memory tuning results start empty.
"""

from __future__ import annotations

import time

import triton
import triton.language as tl

# A comment that a compile key must ignore: run 1234 on /home/ci/job-42.


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask),
             mask=mask)


#: Kernel signature for ``triton.compile(ASTSource(...))`` of add_kernel with BLOCK fixed.
ADD_SIGNATURE = {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}


def _zero_out(args: dict) -> None:
    args["out_ptr"].zero_()


def configs(variant: str = "base") -> list[triton.Config]:
    """Candidate lists: ``base``; ``wider`` (one more candidate); ``hooked`` (configs with a pre_hook,
    which Triton's own result cache refuses to store)."""
    blocks = {"base": (16, 32, 64), "wider": (16, 32, 64, 128), "hooked": (16, 32, 64)}[variant]
    hook = _zero_out if variant == "hooked" else None
    return [triton.Config({"BLOCK": b}, num_warps=4, pre_hook=hook) for b in blocks]


class CountingBench:
    """A CPU timer with Triton's ``do_bench(fn, quantiles)`` shape that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fn, quantiles=None):  # noqa: ANN001, ANN204 - Triton's callback shape
        self.calls += 1
        start = time.perf_counter()
        fn()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        return [elapsed_ms, elapsed_ms, elapsed_ms]
