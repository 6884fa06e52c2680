"""Large members are hashed by the reader thread (prefetch ``large_member``): still checked first.

A max-autotune cache holds one 30 MB FX-graph entry; ``archive.unpack`` hands members of 1 MiB or
more to the reader thread to hash, whatever the queue's backlog. These tests pin that the switch
changed who hashes, not what is checked: a tampered large member is refused with nothing placed,
and honest ones land byte for byte, next to small members hashed by the caller.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from bundler.bundle import archive
from bundler.config import Settings
from bundler.errors import IntegrityError

from bundles import craft, honest, regular, snapshot

SETTINGS = Settings(zstd_threads=1)
BIG = 2 << 20  # over archive._WORKER_HASHES_FROM


def test_threshold_is_below_the_test_size():
    assert archive._WORKER_HASHES_FROM <= BIG


def test_tampered_large_member_is_refused_and_nothing_is_placed(tmp_path: Path):
    genuine = os.urandom(BIG)
    tampered = genuine[:-1] + bytes([genuine[-1] ^ 1])  # same size: only the hash can tell
    files = {"a/small.json": b"{}", "b/graph.pkl": genuine, "c/kernel.ptx": b"ptx" * 100}
    members = [regular(n, tampered if n == "b/graph.pkl" else d) for n, d in sorted(files.items())]
    data, digest = craft(members, files)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_bytes(b"already here")
    before = snapshot(tmp_path)
    with pytest.raises(IntegrityError, match="b/graph.pkl"):
        archive.unpack(io.BytesIO(data), dest, expected_digest=digest, settings=SETTINGS)
    assert snapshot(tmp_path) == before
    with pytest.raises(IntegrityError, match="b/graph.pkl"):
        archive.verify(io.BytesIO(data), expected_digest=digest, settings=SETTINGS)


def test_large_and_small_members_land_intact(tmp_path: Path):
    files = {f"k{i}/kernel.bin": os.urandom(3000 + i) for i in range(40)}
    files["inductor/fx/entry"] = os.urandom(BIG) + b"".join(files.values())
    files["z/last.json"] = b'{"n": 1}'
    data, digest = honest(files)
    man = archive.unpack(io.BytesIO(data), tmp_path, expected_digest=digest, settings=SETTINGS)
    assert len(man.files) == len(files)
    for name, content in files.items():
        assert (tmp_path / name).read_bytes() == content
