"""A deterministic, Triton-cache-shaped corpus for benchmarks (and its real-fixture loader).

Shape follows a real Triton cache: one folder per kernel hash (52 base32 characters) holding
``.cubin .ptx .ttir .ttgir .llir .json`` plus a ``__grp__*.json`` group file with absolute child
paths. Text files are built from a fixed pool of IR-like lines so they compress like real IR;
cubins are part random, part repeated, like real binaries. Same seed, same bytes, every run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import tarfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"

_OPS = ["add", "mul", "fma", "ld.global", "st.global", "mov", "cvt", "setp", "bra", "shl", "and", "or"]
_TYPES = ["f16", "f32", "b32", "u64", "s32", "pred"]
_SUFFIXES = {".ptx": 5.0, ".ttir": 0.5, ".ttgir": 0.7, ".llir": 2.5, ".cubin": 2.0}


def _line_pool(rng: random.Random, n: int = 4000) -> list[str]:
    pool = []
    for _ in range(n):
        op, ty = rng.choice(_OPS), rng.choice(_TYPES)
        regs = ", ".join(f"%r{rng.randrange(400)}" for _ in range(rng.randrange(1, 4)))
        pool.append(f"\t{op}.{ty} \t{regs}; // line {rng.randrange(10_000)}\n")
    return pool


def _text(rng: random.Random, pool: list[str], size: int) -> bytes:
    out, total = [], 0
    while total < size:
        line = pool[rng.randrange(len(pool))]
        out.append(line)
        total += len(line)
    return "".join(out).encode()[:size]


def _binary(rng: random.Random, size: int, motif: bytes) -> bytes:
    half = size // 2
    return (rng.randbytes(half) + motif * (size // max(1, len(motif)) + 1))[:size]


def make_corpus(root: Path, *, kernels: int = 630, mean_kb: int = 50, seed: int = 7) -> tuple[int, int]:
    """Write the corpus under ``root``; returns (files, bytes). 630 kernels ~ 4,400 files, ~170 MB."""
    rng = random.Random(seed)
    pool = _line_pool(rng)
    motif = rng.randbytes(4096)
    files = total = 0
    for k in range(kernels):
        key = base64.b32encode(hashlib.sha256(f"{seed}-{k}".encode()).digest()).decode().rstrip("=")[:52]
        folder = root / key
        folder.mkdir(parents=True, exist_ok=True)
        name = f"kernel_{k % 37}"
        children = {}
        for suffix, weight in _SUFFIXES.items():
            size = max(256, int(rng.expovariate(1 / (mean_kb * 1024 * weight / 2.0))))
            data = _binary(rng, size, motif) if suffix == ".cubin" else _text(rng, pool, size)
            path = folder / f"{name}{suffix}"
            path.write_bytes(data)
            children[path.name] = str(path)
            files, total = files + 1, total + len(data)
        meta = json.dumps({"name": name, "num_warps": 4, "num_stages": 3, "hash": key}).encode()
        (folder / f"{name}.json").write_bytes(meta)
        (folder / f"__grp__{name}.json").write_bytes(json.dumps({"child_paths": children}).encode())
        files, total = files + 2, total + len(meta) + 200
    return files, total


def extract_fixture(name: str, root: Path) -> Path:
    """Unpack one of the real H200 caches in tests/fixtures (data only, never executed)."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(FIXTURES / name) as tar:
        tar.extractall(root, filter="data")
    return root


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic Triton-shaped corpus into DIR.")
    parser.add_argument("dir", type=Path)
    files, size = make_corpus(parser.parse_args().dir)
    print(f"{files} files, {size} bytes")
