"""The bundle format: round trips, determinism, interop with GNU tar, and unpack semantics."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundler.bundle import archive, manifest
from bundler.bundle.manifest import MANIFEST_NAME
from bundler.config import Settings
from bundler.errors import UnsafeMemberError
from bundler.fileio import FileOps

from bundles import snapshot, write_tree

SETTINGS = Settings(zstd_threads=1)

_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-ÄéΩ", min_size=1, max_size=40).filter(
    # pack skips folders named like an unpack's staging folder (left by a killed unpack)
    lambda s: s not in (".", "..") and s != MANIFEST_NAME and not s.startswith(".bundler-staging-")
)
_paths = st.lists(_segment, min_size=1, max_size=4).map("/".join)
_trees = st.dictionaries(_paths, st.binary(max_size=3000), min_size=0, max_size=25).filter(
    # a path cannot be both a file and a folder on disk (test_file_and_folder_conflict covers it)
    lambda tree: not any(a != b and b.startswith(a + "/") for a in tree for b in tree)
)


def pack_bytes(source, **kwargs) -> tuple[bytes, archive.PackResult]:
    out = io.BytesIO()
    result = archive.pack(source, out, settings=kwargs.pop("settings", SETTINGS), **kwargs)
    return out.getvalue(), result


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_trees)
def test_round_trip_of_random_trees(tmp_path_factory, tree):
    src = tmp_path_factory.mktemp("src")
    dest = tmp_path_factory.mktemp("dest")
    write_tree(src, tree)
    data, result = pack_bytes(src)
    man = archive.unpack(io.BytesIO(data), dest, expected_digest=result.digest, settings=SETTINGS)
    assert man.digest == result.digest
    assert {r.path: (dest / r.path).read_bytes() for r in man.files} == tree
    assert snapshot(dest) == snapshot(src)


def test_mapping_source_and_bytes_give_same_bundle_as_directory(tmp_path):
    files = {"a/x.cubin": b"\x7fELF" + bytes(100), "b.json": b"{}"}
    write_tree(tmp_path, files)
    from_dir, r1 = pack_bytes(tmp_path)
    from_map, r2 = pack_bytes({"b.json": tmp_path / "b.json", "a/x.cubin": files["a/x.cubin"]})
    assert from_dir == from_map and r1.digest == r2.digest


def test_output_ignores_mtimes_owners_modes_and_discovery_order(tmp_path):
    files = {f"k{i}/f{j}.ptx": os.urandom(50) * j for i in range(5) for j in range(4)}
    a, b = tmp_path / "a", tmp_path / "b"
    write_tree(a, files)
    write_tree(b, dict(reversed(list(files.items()))))
    for path in b.rglob("*"):
        os.utime(path, (12345, 67890))
        if path.is_file():
            path.chmod(0o600)
    assert pack_bytes(a)[0] == pack_bytes(b)[0]


def test_same_bytes_in_another_process_with_other_thread_count(tmp_path):
    write_tree(tmp_path / "src", {f"d{i}/file{i}.llir": (b"line %d\n" % i) * 5000 for i in range(30)})
    here, result = pack_bytes(tmp_path / "src", settings=Settings(zstd_threads=2))
    code = (
        "import sys, io; from pathlib import Path; from bundler.bundle import archive; from bundler.config import Settings;"
        "out = io.BytesIO(); archive.pack(Path(sys.argv[1]), out, settings=Settings(zstd_threads=1));"
        "sys.stdout.buffer.write(out.getvalue())"
    )
    there = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "src")], capture_output=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    ).stdout
    assert there == here
    assert len(result.digest) == 64


def test_gnu_tar_lists_and_extracts_a_bundle(tmp_path):
    if not shutil.which("tar") or subprocess.run(["tar", "--zstd", "--version"], capture_output=True).returncode:
        pytest.fail("GNU tar with --zstd is required for the interop test (apt-get install tar zstd)")
    files = {"a/b/c.cubin": os.urandom(3000), "long/" + "n" * 150 + "/x.json": b"{}", "ünï/côdé.ptx": b"ptx"}
    write_tree(tmp_path / "src", files)
    data, _ = pack_bytes(tmp_path / "src")
    bundle = tmp_path / "b.tar.zst"
    bundle.write_bytes(data)
    listing = subprocess.run(["tar", "--zstd", "-tf", bundle], capture_output=True, check=True, text=True).stdout
    assert listing.splitlines() == [MANIFEST_NAME, *sorted(files, key=manifest.stream_key)]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", bundle, "-C", out], check=True)
    for name, content in files.items():
        assert (out / name).read_bytes() == content


def test_python_tarfile_reads_a_bundle(tmp_path):
    files = {"x/" + "y" * 120 + ".bin": b"abc", "plain.txt": b"hello"}
    data, _ = pack_bytes(files)
    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.getnames() == [MANIFEST_NAME, "x/" + "y" * 120 + ".bin", "plain.txt"]  # by extension
        assert tar.extractfile("plain.txt").read() == b"hello"


def test_long_distance_matching_shrinks_far_apart_repeats():
    """A kernel repeated inside a large pickle, as Inductor's FX-graph cache does."""
    kernel = os.urandom(1 << 20)
    # 6 MiB apart: beyond level 3's normal 2 MiB window, well inside the 16 MiB long window
    files = {"triton/k.cubin": kernel, "inductor/graph.pkl": os.urandom(6 << 20) + kernel + os.urandom(6 << 20)}
    with_ldm, _ = pack_bytes(files)
    without, _ = pack_bytes(files, settings=Settings(zstd_threads=1, long_window_log=0))
    assert len(with_ldm) < len(without) - (900 << 10)


def test_unpack_into_mapping_routes_by_first_component(tmp_path):
    data, result = pack_bytes({"triton/ab/k.cubin": b"bin", "autotune/k.json": b"{}"})
    roots = {"triton": tmp_path / "tc", "autotune": tmp_path / "at"}
    archive.unpack(io.BytesIO(data), roots, expected_digest=result.digest, settings=SETTINGS)
    assert (tmp_path / "tc/ab/k.cubin").read_bytes() == b"bin"
    assert (tmp_path / "at/k.json").read_bytes() == b"{}"


def test_unpack_into_mapping_rejects_unmapped_members(tmp_path):
    data, _ = pack_bytes({"triton/k": b"1", "elsewhere/k": b"2"})
    with pytest.raises(UnsafeMemberError, match="elsewhere/k"):
        archive.unpack(io.BytesIO(data), {"triton": tmp_path / "tc"}, settings=SETTINGS)
    assert not (tmp_path / "tc").exists()  # not even the destination folder is left behind


def test_existing_identical_and_unrelated_files_are_kept(tmp_path):
    files = {"k/a.json": b"A", "k/b.json": b"B"}
    data, _ = pack_bytes(files)
    dest = tmp_path / "dest"
    write_tree(dest, {"k/a.json": b"A", "other/keep.txt": b"mine"})
    archive.unpack(io.BytesIO(data), dest, settings=SETTINGS)
    assert snapshot(dest) == {
        "k": ("dir",), "other": ("dir",), "k/a.json": ("file", b"A"), "k/b.json": ("file", b"B"),
        "other/keep.txt": ("file", b"mine"),
    }


class _Upper:
    def wants(self, name: str) -> bool:
        return name.endswith(".json")

    def __call__(self, name: str, data: bytes, target: Path) -> bytes:
        return data.upper() + str(target).encode()


def test_rewriter_sees_verified_bytes_and_final_target(tmp_path):
    data, _ = pack_bytes({"a.json": b"abc", "b.bin": b"abc"})
    archive.unpack(io.BytesIO(data), tmp_path, settings=SETTINGS, rewrite=_Upper())
    assert (tmp_path / "a.json").read_bytes() == b"ABC" + str(tmp_path / "a.json").encode()
    assert (tmp_path / "b.bin").read_bytes() == b"abc"


def test_pack_refuses_symlinks_in_the_source(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/real").write_bytes(b"x")
    (tmp_path / "src/link").symlink_to(tmp_path / "src/real")
    with pytest.raises(UnsafeMemberError, match="symbolic link"):
        pack_bytes(tmp_path / "src")


def test_pack_of_a_missing_directory_is_a_clear_error(tmp_path):
    from bundler.errors import BundlerError, LocalFileNotFoundError

    with pytest.raises(LocalFileNotFoundError, match="no such directory") as info:  # a local miss, not a store's
        pack_bytes(tmp_path / "nope")
    assert info.value.exit_code == 3  # like any miss
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(BundlerError, match="not a directory"):
        pack_bytes(tmp_path / "file")


def _unpack_worker(args):
    data, dest = args
    for _ in range(5):
        archive.unpack(io.BytesIO(data), Path(dest), settings=SETTINGS)
    return True


def test_concurrent_unpacks_into_one_directory_all_succeed(tmp_path):
    import multiprocessing

    files = {f"k{i}/f{j}.bin": os.urandom(2000 + i * j) for i in range(20) for j in range(5)}
    data, _ = pack_bytes(files)
    dest = tmp_path / "dest"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert all(pool.map(_unpack_worker, [(data, str(dest))] * 4))
    assert {p: (dest / p).read_bytes() for p in files} == files
    assert not [p for p in dest.iterdir() if p.name.startswith(".bundler-staging-")]


def test_verify_and_read_manifest_do_not_write(tmp_path):
    data, result = pack_bytes({"a": b"1", "b/c": b"22"})
    assert archive.verify(io.BytesIO(data), expected_digest=result.digest, settings=SETTINGS).digest == result.digest
    man = archive.read_manifest(io.BytesIO(data), settings=SETTINGS)
    assert [(r.path, r.size) for r in man.files] == [("a", 1), ("b/c", 2)]


def test_file_and_folder_conflict_is_refused_at_pack(tmp_path):
    with pytest.raises(UnsafeMemberError, match="both a file and a folder"):
        pack_bytes({"a": b"file", "a/b": b"inside"})


def test_stale_staging_left_by_a_killed_process_is_swept(tmp_path):
    from bundler.bundle import placement

    stale = tmp_path / f"{placement.STAGING_PREFIX}dead"
    fresh = tmp_path / f"{placement.STAGING_PREFIX}busy"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "0").write_bytes(b"partial")
    old = os.stat(stale).st_mtime - placement.STALE_STAGING_SECONDS - 10
    os.utime(stale, (old, old))
    data, _ = pack_bytes({"x": b"1"})
    archive.unpack(io.BytesIO(data), tmp_path, settings=SETTINGS)
    assert not stale.exists() and fresh.exists()  # another process may still be using the fresh one


def test_new_folders_move_whole_and_existing_ones_merge(tmp_path):
    """A warm cache gains the kernels it lacked and keeps the files the bundle does not carry."""
    dest = tmp_path / "cache"
    (dest / "old").mkdir(parents=True)
    (dest / "old/keep.txt").write_bytes(b"mine")
    (dest / "old/k.bin").write_bytes(b"stale")
    files = {"old/k.bin": b"fresh", "new/deep/a.bin": b"a", "new/b.bin": b"b", "top.json": b"{}"}
    data, _ = pack_bytes(files)
    archive.unpack(io.BytesIO(data), dest, settings=SETTINGS)
    assert {p: (dest / p).read_bytes() for p in files} == files
    assert (dest / "old/keep.txt").read_bytes() == b"mine"
    assert sorted(p.name for p in dest.iterdir()) == ["new", "old", "top.json"]


class _RacingOps(FileOps):
    """Runs ``race`` once, just before the commit's first rename: after unpack decided a folder is
    absent and checked its targets, the window in which another process can change the cache."""

    def __init__(self, race) -> None:
        self._race = race

    def rename(self, src, dst, **kwargs) -> None:
        race, self._race = self._race, None
        if race is not None:
            race()
        super().rename(src, dst, **kwargs)


def test_folder_made_by_another_process_meanwhile_is_merged(tmp_path):
    dest = tmp_path / "cache"
    data, _ = pack_bytes({"k/a.bin": b"ours", "k/sub/b.bin": b"ours too"})

    def other_process():
        (dest / "k").mkdir()
        (dest / "k/theirs.bin").write_bytes(b"theirs")

    archive.unpack(io.BytesIO(data), dest, settings=SETTINGS, ops=_RacingOps(other_process))
    files = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert files == {"k/a.bin": b"ours", "k/sub/b.bin": b"ours too", "k/theirs.bin": b"theirs"}


def test_link_planted_meanwhile_is_not_written_through(tmp_path):
    dest, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    data, _ = pack_bytes({"k/a.bin": b"payload"})
    with pytest.raises(UnsafeMemberError, match="outside"):
        archive.unpack(io.BytesIO(data), dest, settings=SETTINGS,
                       ops=_RacingOps(lambda: (dest / "k").symlink_to(outside)))
    assert list(outside.iterdir()) == []
    assert [p.name for p in dest.iterdir()] == ["k"]  # the planted link, and no staging folder


def test_refusal_after_a_lost_race_takes_back_folders_already_moved(tmp_path):
    """All or nothing even then: 'a' moved whole, 'b' turned into a link meanwhile; 'a' goes back."""
    dest, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    data, _ = pack_bytes({"a/x.bin": b"x", "b/y.bin": b"y", "top.json": b"{}"})
    with pytest.raises(UnsafeMemberError, match="outside"):
        archive.unpack(io.BytesIO(data), dest, settings=SETTINGS,
                       ops=_RacingOps(lambda: (dest / "b").symlink_to(outside)))
    assert [p.name for p in dest.iterdir()] == ["b"]  # only the planted link
    assert list(outside.iterdir()) == []


def test_a_long_unpack_keeps_its_staging_folder_from_being_swept(tmp_path, monkeypatch):
    """Another unpack removes staging folders untouched for an hour; a live one must not look so."""
    from bundler.bundle import placement

    monkeypatch.setattr(placement, "_KEEP_ALIVE_SECONDS", 0)
    live = placement.Placement(tmp_path)
    staged = Path(live.stage("k/deep/a.bin").shown)
    staged.write_bytes(b"a")
    staging = staged.parents[3]  # <staging>/t/k/deep/a.bin
    old = staging.stat().st_mtime - placement.STALE_STAGING_SECONDS - 10
    os.utime(staging, (old, old))  # an hour of streaming one folder's members
    live.stage("k/deep/b.bin")  # staging the next member says "alive"
    data, _ = pack_bytes({"other": b"1"})
    archive.unpack(io.BytesIO(data), tmp_path, settings=SETTINGS)  # sweeps stale staging
    assert staging.is_dir()
    Path(live.stage("k/c.bin").shown).write_bytes(b"c")
    Path(staging / "t/k/deep/b.bin").write_bytes(b"b")
    live.commit()
    assert (tmp_path / "k/deep/a.bin").read_bytes() == b"a" and (tmp_path / "k/c.bin").read_bytes() == b"c"


def test_records_keep_what_frozen_dataclasses_gave_them():
    import dataclasses
    import pickle

    record = manifest.FileRecord("a/b", 3, "0" * 64)
    man = manifest.build([record], {"bundler": "t"})
    assert record == manifest.FileRecord("a/b", 3, "0" * 64) and hash(record) == hash(manifest.FileRecord("a/b", 3, "0" * 64))
    assert repr(record) == f"FileRecord(path='a/b', size=3, sha256='{'0' * 64}')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.size = 4  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(man)) == man and man.producer == {"bundler": "t"}
    assert manifest.Manifest((record,)).producer == {}


def test_a_manifest_encoding_kept_for_the_digest_follows_its_producer():
    man = manifest.build([manifest.FileRecord("a", 1, "0" * 64)], {"k": "v"})
    first = man.digest
    man.producer["k"] = "w"  # type: ignore[index]  # a plain dict: nothing stops a caller
    assert man.digest != first
    assert man.encode() == manifest.build(man.files, {"k": "w"}).encode()


class _Path(str):
    """A str subclass: check_path's fast path takes exact str only, so this takes the full steps."""


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="ab./\\\x00é\n", max_size=12) | st.sampled_from(
    ["a", "a/b", ".a", "..a", "a..", "a/.../b", "x" * 255, "x" * 256, "a/" + "y" * 256, "/".join("a" * 32),
     "/".join("a" * 33), "z" * 1024, "z" * 1025, MANIFEST_NAME, "a/./b", "a/../b", "./a", "a/.", "a//b"]))
def test_check_path_fast_path_agrees_with_the_full_rules(path):
    def outcome(p):
        try:
            return manifest.check_path(p) == p
        except UnsafeMemberError as exc:
            return str(exc)

    assert outcome(path) == outcome(_Path(path))


def test_tar_checksum_is_the_byte_sum():
    import random

    from bundler.bundle import tarformat

    rng = random.Random(12)
    blocks = [bytes(512), b"\xff" * 512, os.urandom(512)]
    blocks += [bytes(rng.choice((0, 1, 32, 254, 255)) for _ in range(512)) for _ in range(300)]
    for target in (65519, 65520, 65521, 65522, 65521 + 241, 130559, 130560):
        blocks.append(bytes(min(255, max(0, target - 255 * i)) for i in range(512)))
    for block in blocks:
        assert tarformat.checksum(block) == sum(block)


@pytest.mark.parametrize("change", [-1, +1])
def test_a_source_file_that_changes_size_while_packed_is_an_error(tmp_path, monkeypatch, change):
    """The header promised fstat's size; more bytes, or fewer, than that is an error, not a bundle."""
    from bundler.bundle import writer
    from bundler.errors import BundlerError

    for size in (0, 10, writer._BATCH - 512 - 1, writer._BATCH - 512, 3 * writer._BATCH + 7):
        src = tmp_path / f"src{size}"
        write_tree(src, {"f": os.urandom(size)})
        real = os.fstat

        def fstat(fd, real=real):
            st = real(fd)
            return os.stat_result((*st[:6], st.st_size - change, *st[7:]))

        if size == 0 and change == 1:
            continue  # no negative sizes
        monkeypatch.setattr(writer.os, "fstat", fstat)
        with pytest.raises(BundlerError, match="changed size"):
            archive.pack(src, io.BytesIO())
        monkeypatch.undo()
        data = io.BytesIO()
        archive.pack(src, data)
        data.seek(0)
        archive.unpack(data, tmp_path / f"out{size}")
        assert (tmp_path / f"out{size}" / "f").read_bytes() == (src / "f").read_bytes()
