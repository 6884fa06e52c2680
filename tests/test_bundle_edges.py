"""Edges of the bundle layer found in review: what pack reads, what roll-back restores, whose
staging folder a sweep may take. Grouped by failure class; each test names the reproduction it
is based on (``/tmp/review_bundle/<script>``).
"""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundler import fileio
from bundler.bundle import archive, placement, writer
from bundler.config import Settings
from bundler.errors import UnsafeMemberError
from bundler.fileio import FileOps

from bundles import packed, write_tree

SETTINGS = Settings(zstd_threads=1)
REPO = Path(__file__).resolve().parents[1]
SECRET = b"-----BEGIN PRIVATE KEY----- top secret\n"


# --- pack reads regular files only, never through a link (pack_follows_links.py, pack_fifo_hang.py)


@pytest.fixture
def shared_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A cache with one honest file, and a secret outside it that another user wants packed."""
    secret = tmp_path / "outside/id_rsa"
    write_tree(tmp_path, {"outside/id_rsa": SECRET, "triton/k/good.json": b"{}"})
    return tmp_path / "triton", secret


def test_a_named_source_that_is_a_link_is_refused(shared_cache):
    """Sessions and save_artifacts pack by name: a link planted at a recorded name is not read."""
    cache, secret = shared_cache
    (cache / "k/a.json").symlink_to(secret)
    with pytest.raises(UnsafeMemberError, match=r"a\.json: it is a symbolic link"):
        packed({"triton/k/a.json": cache / "k/a.json", "triton/k/good.json": cache / "k/good.json"})


def test_a_named_source_that_is_a_fifo_is_refused_without_waiting(shared_cache):
    """A FIFO swapped in after the recorded file was checked: refused, never opened blocking."""
    cache, _ = shared_cache
    os.mkfifo(cache / "k/a.json")
    with pytest.raises(UnsafeMemberError, match=r"a\.json: not a regular file"):
        packed({"triton/k/a.json": cache / "k/a.json"})


def test_a_fifo_with_a_writer_is_refused_as_not_a_regular_file(shared_cache):
    """With a writer holding it open a FIFO opens at once anywhere; it is still no member."""
    cache, _ = shared_cache
    os.mkfifo(cache / "k/a.json")
    fd = os.open(cache / "k/a.json", os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, b"x")
        with pytest.raises(UnsafeMemberError, match="not a regular file"):
            packed({"triton/k/a.json": cache / "k/a.json"})
    finally:
        os.close(fd)


def test_a_named_folder_is_refused(shared_cache):
    cache, _ = shared_cache
    with pytest.raises(UnsafeMemberError, match="not a regular file"):
        packed({"triton/k": cache / "k"})


def _swap_after_scan(monkeypatch, swap) -> None:
    real = writer._collect

    def collect_then_swap(source, settings):
        items = real(source, settings)
        swap()  # another user of the shared cache, between the scan and the read
        return items

    monkeypatch.setattr(writer, "_collect", collect_then_swap)


def test_a_file_swapped_for_a_link_after_the_scan_is_refused(shared_cache, monkeypatch):
    cache, secret = shared_cache
    (cache / "k/a.json").write_bytes(b"honest")

    def swap() -> None:
        os.unlink(cache / "k/a.json")
        os.symlink(secret, cache / "k/a.json")

    _swap_after_scan(monkeypatch, swap)
    with pytest.raises(UnsafeMemberError, match="symbolic link"):
        packed(cache)


def test_a_folder_swapped_for_a_link_after_the_scan_cannot_redirect_the_read(shared_cache, monkeypatch):
    """O_NOFOLLOW guards the last component only: the walk's (st_dev, st_ino) guards the folders."""
    cache, secret = shared_cache
    (cache / "k/id_rsa").write_bytes(b"honest")

    def swap() -> None:
        os.rename(cache / "k", cache.parent / "k-moved")
        os.symlink(secret.parent, cache / "k")

    _swap_after_scan(monkeypatch, swap)
    with pytest.raises(UnsafeMemberError, match="id_rsa: it is not the file found there"):
        packed(cache)


def test_a_file_replaced_after_the_scan_is_refused(shared_cache, monkeypatch):
    cache, _ = shared_cache
    _swap_after_scan(monkeypatch, lambda: os.replace(_written(cache.parent / "new", b"new"), cache / "k/good.json"))
    with pytest.raises(UnsafeMemberError, match="not the file found there"):
        packed(cache)


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_honest_sources_still_pack_the_same_bytes(shared_cache):
    cache, _ = shared_cache
    named = {"k/good.json": cache / "k/good.json"}
    assert packed(cache) == packed(named) == packed({"k/good.json": b"{}"})


# --- a live unpack's staging folder is never swept (pidns_sweep.py, pidns_sweep_partial.py) ------

_OTHER_UNPACK = """
import sys
sys.path.insert(0, {repo!r})
from bundler.bundle import archive, placement
from bundler.config import Settings
{fake}
archive.unpack(open({bundle!r}, "rb"), {dest!r}, settings=Settings(zstd_threads=1))
print("swept" if not any(n.startswith(".bundler-staging-") for n in __import__("os").listdir({dest!r})) else "kept")
"""


class _OtherUnpackAtCommit(FileOps):
    """Right before this unpack's first move, another process unpacks into the same folder."""

    def __init__(self, command: list[str]) -> None:
        self.command, self.result = command, None

    def rename(self, src, dst, **kw) -> None:
        if self.result is None:
            self.result = subprocess.run(self.command, capture_output=True, text=True, timeout=120)
        super().rename(src, dst, **kw)


def _race(tmp_path: Path, prefix: list[str], fake: str) -> tuple[subprocess.CompletedProcess, Path]:
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "other.tar.zst").write_bytes(packed({"other/a.bin": b"a"}))
    code = _OTHER_UNPACK.format(repo=str(REPO), fake=fake, bundle=str(tmp_path / "other.tar.zst"), dest=str(dest))
    ops = _OtherUnpackAtCommit([*prefix, sys.executable, "-c", code])
    data = packed({f"kern/{i:02}.bin": b"x" * 100 for i in range(20)})
    archive.unpack(io.BytesIO(data), dest, settings=SETTINGS, ops=ops)
    assert ops.result is not None and ops.result.returncode == 0, ops.result and ops.result.stderr
    assert sorted(os.listdir(dest / "kern")) == [f"{i:02}.bin" for i in range(20)]
    return ops.result, dest


def test_a_sweep_that_takes_a_live_owner_for_dead_leaves_its_staging_alone(tmp_path):
    """The other unpack believes every pid on this host dead, as one in another pid namespace
    does (its os.kill finds no such process); the staging folder's lock tells it otherwise.
    Same namespace, owner check faked: the lock logic itself, wherever unshare is not allowed."""
    fake = "from bundler import fileio\nplacement.owner_is_gone = lambda parts: True"
    result, _ = _race(tmp_path, [], fake)
    assert result.stdout.strip() == "kept"


def test_a_sweep_from_another_pid_namespace_leaves_a_live_staging_folder_alone(tmp_path):
    """pidns_sweep.py for real: the other unpack runs in a new pid namespace (``unshare -p``)."""
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -p is not allowed here; the faked-owner test covers the lock logic")
    result, _ = _race(tmp_path, ["unshare", "-p", "-f", "--mount-proc"], "")
    assert result.stdout.strip() == "kept"


def test_an_abandoned_staging_folder_is_still_swept(tmp_path):
    """The lock adds a guard, it takes none away: a dead owner's folder goes at once."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"{placement.STAGING_PREFIX}{fileio.HOST}-{dead.pid}-0123abcd"
    write_tree(left, {"t/k/partial.bin": b"partial"})
    archive.unpack(io.BytesIO(packed({"x": b"1"})), tmp_path, settings=SETTINGS)
    assert not left.exists()


def test_host_tags_are_one_to_one():
    """gpu-1 and gpu_1 were one tag (both became gpu_1): each host could sweep the other's live
    staging folders on a shared cache. Tags never hold '-', which splits the folder names."""
    assert fileio.host_tag("gpu-1") != fileio.host_tag("gpu_1")
    names = ["".join(p) for n in range(4) for p in itertools.product("a-_.é", repeat=n)]
    tags = [fileio.host_tag(name) for name in names]
    assert len(set(tags)) == len(names)
    assert not any("-" in tag for tag in tags)
    assert fileio.host_tag("a" * 30 + "-" * 30) != fileio.host_tag("a" * 30 + "-" * 29 + "_")
    assert all(len(fileio.host_tag(name)) <= 64 for name in ("-" * 64, "x" * 64, "é" * 32))
