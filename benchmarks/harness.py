"""Timing helpers shared by the benchmarks: whole commands, repeated, median, same run."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BUNDLER = [sys.executable, "-m", "bundler.cli"]
SCRATCH_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


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
