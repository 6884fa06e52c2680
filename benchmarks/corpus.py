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


# --- max-autotune-shaped profile ---------------------------------------------------------------
#
# Modelled on the real H200 max-autotune cache in tests/fixtures/README.md: 1,591 files, 68 MB raw,
# ~150 Inductor files / 31 MB (one 30 MB FX-graph pickle that embeds the kernels) and 1,441 Triton
# files / 35 MB (180 kernel folders of 8 files). Kernels of one autotuned op differ only in their
# config (block sizes, warps, stages), so they are near-copies of a few templates; the pickle
# repeats their text far away from the Triton folder, which only long-distance matching sees.

_RUN = RUN_LINES = 40
POOL, BASE, CUBIN_UNIQUE = 1000, 5000, 3
_MA_FILES = {".source": 9, ".ttir": 14, ".ttgir": 22, ".llir": 55, ".ptx": 70, ".cubin": 26}


def _template(rng: random.Random, base: list[str], kb: int) -> list[str]:
    """Runs of consecutive lines of a shared base text, as IR repeats its idioms (loads, loops)."""
    lines: list[str] = []
    total = 0
    while total < kb * 1024:
        start = rng.randrange(len(base) - _RUN)
        run = base[start : start + rng.randrange(_RUN // 4, _RUN)]
        lines.extend(run)
        total += sum(map(len, run))
    return lines


def _variant(rng: random.Random, lines: list[str], config: str, mutate: float) -> bytes:
    """A template's text for one autotune config: a header naming it, a few lines changed."""
    out = [f"// config {config}\n"]
    for line in lines:
        if rng.random() < mutate:
            line = line.replace("%r", f"%r{rng.randrange(10)}", 1)
        out.append(line)
    return "".join(out).encode()


def make_max_autotune_corpus(root: Path, *, kernels: int = 180, families: int = 45, seed: int = 11) -> tuple[int, int]:
    """Write a max-autotune-shaped cache under ``root``; returns (files, bytes). ~1,600 files, ~70 MB.

    ``inductor_cache_dir/`` holds one large FX-graph entry (a pickle-like blob of every kernel's
    files), generated ``.py`` output code, ``.best_config`` files and small AOTAutograd entries;
    ``triton_cache_dir/`` holds one folder per kernel. Same seed, same bytes.
    """
    rng = random.Random(seed)
    pool = _line_pool(rng, POOL)
    base = [pool[rng.randrange(len(pool))] for _ in range(BASE)]
    templates = [{s: _template(rng, base, kb) for s, kb in _MA_FILES.items()} for _ in range(families)]
    files = total = 0

    def put(path: Path, data: bytes) -> None:
        nonlocal files, total
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files, total = files + 1, total + len(data)

    triton = root / "triton_cache_dir"
    inductor = root / "inductor_cache_dir"
    blobs: list[bytes] = []
    for k in range(kernels):
        family = templates[k % families]
        key = base64.b32encode(hashlib.sha256(f"ma-{seed}-{k}".encode()).digest()).decode().rstrip("=")[:52]
        name = f"triton_poi_fused_{k % families}_{k // families}"
        config = f"BLOCK_M={16 << k % 4} BLOCK_N={32 << k % 3} num_warps={4 << k % 2} num_stages={2 + k % 3}"
        children = {}
        for suffix in _MA_FILES:
            data = _variant(rng, family[suffix], config, 0.002)
            if suffix == ".cubin":  # binary: a unique part (addresses, relocations), the rest shared
                data = rng.randbytes(len(data) // CUBIN_UNIQUE) + data
            put(triton / key / f"{name}{suffix}", data)
            children[f"{name}{suffix}"] = str(triton / key / f"{name}{suffix}")
            blobs.append(data)
        meta = json.dumps({"name": name, "hash": key, "config": config, "target": [90, 32]}).encode()
        put(triton / key / f"{name}.json", meta)
        put(triton / key / f"__grp__{name}.json", json.dumps({"child_paths": children}).encode())
        if k % 2 == 0:
            put(inductor / "best_configs" / f"{key[:20]}.best_config", meta)
    # The FX-graph entry: every kernel's files again (Inductor's triton bundler), pickle-framed.
    graph = b"".join(b"\x80\x04\x95" + len(b).to_bytes(8, "little") + b for b in blobs)
    put(inductor / "fxgraph" / "fx" / "fzq3n2ktrpcq" / "entry", graph[: 30 << 20])
    for i in range(24):  # generated output code: the kernels' Python sources
        code = b"".join(_variant(rng, templates[(i + j) % families][".source"], f"graph {i}", 0.01) for j in range(3))
        put(inductor / "output_code" / f"c{i:02d}" / f"c{i:02d}rmfx2ql5lza.py", code)
    for i in range(40):
        put(inductor / "aotautograd" / f"a{i:02d}" / "entry", rng.randbytes(600) + b"\0" * 1400)
    return files, total


def extract_fixture(name: str, root: Path) -> Path:
    """Unpack one of the real H200 caches in tests/fixtures (data only, never executed)."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(FIXTURES / name) as tar:
        tar.extractall(root, filter="data")
    return root


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a synthetic cache-shaped corpus into DIR.")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--profile", choices=("synthetic", "max-autotune"), default="synthetic")
    args = parser.parse_args()
    make = make_max_autotune_corpus if args.profile == "max-autotune" else make_corpus
    files, size = make(args.dir)
    print(f"{files} files, {size} bytes")
