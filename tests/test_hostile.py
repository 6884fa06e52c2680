"""Hostile and broken bundles: each is rejected with the right error and changes nothing.

Every case unpacks into ``tmp/dest`` next to ``tmp/outside``; afterwards the whole tmp tree must
be exactly as before: no file written outside, no partial file inside, no staging left behind.
"""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import pytest
import zstandard

from bundler.bundle import archive
from bundler.config import Settings
from bundler.errors import (
    BundleError,
    IntegrityError,
    LimitExceededError,
    ManifestError,
    NotABundleError,
    UnsafeMemberError,
)

from bundles import (
    craft,
    honest,
    manifest_bytes,
    packed,
    raw_header,
    regular,
    snapshot,
    special,
    tar_bytes,
    write_tree,
    zstd,
)

SETTINGS = Settings(zstd_threads=1)
GOOD = {"k/a.cubin": b"\x7fELF" * 100, "k/b.json": b'{"num_warps": 4}', "z/last.ptx": b".version 8.0"}


@pytest.fixture
def area(tmp_path: Path) -> Path:
    write_tree(tmp_path / "dest", {"k/existing.txt": b"keep me"})
    write_tree(tmp_path / "outside", {"precious.txt": b"do not touch"})
    return tmp_path


def rejects(area: Path, data: bytes, error: type[BundleError], match: str, **kwargs) -> BundleError:
    before = snapshot(area)
    with pytest.raises(error, match=match or None) as info:
        archive.unpack(io.BytesIO(data), area / "dest", settings=kwargs.pop("settings", SETTINGS), **kwargs)
    assert snapshot(area) == before
    return info.value


def test_honest_bundle_from_helpers_unpacks(area):
    data, digest = honest(GOOD)
    archive.unpack(io.BytesIO(data), area / "dest", expected_digest=digest, settings=SETTINGS)
    assert (area / "dest/z/last.ptx").read_bytes() == GOOD["z/last.ptx"]


@pytest.mark.parametrize(
    "name, rule",
    [("/etc/passwd", "absolute"), ("../outside/precious.txt", "'..'"), ("k/../../outside/x", "'..'"),
     ("k/./a", "'.'"), ("k//a", "empty"), ("k\\..\\a", "backslash")],
)
def test_escaping_names_are_rejected_in_manifest_and_tar(area, name, rule):
    files = {**GOOD, name: b"evil"}
    rejects(area, craft([regular(n, d) for n, d in sorted(files.items())], files)[0], UnsafeMemberError, rule)
    # the same member smuggled into the tar only, behind an honest manifest
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    rejects(area, craft([members[0], regular(name, b"evil"), *members[1:]], GOOD)[0], UnsafeMemberError, "")


@pytest.mark.parametrize(
    "kind, words",
    [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"), (tarfile.CHRTYPE, "character device"),
     (tarfile.BLKTYPE, "block device"), (tarfile.FIFOTYPE, "FIFO"), (tarfile.DIRTYPE, "directory")],
)
def test_non_regular_members_are_rejected(area, kind, words):
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    evil = special("k/a.cubin", kind, linkname="../../outside/precious.txt")
    err = rejects(area, craft([evil, *members[1:]], GOOD)[0], UnsafeMemberError, words)
    assert "k/a.cubin" in str(err)


def test_duplicate_member_is_rejected(area):
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    rejects(area, craft([members[0], members[0], *members[1:]], GOOD)[0], UnsafeMemberError, "twice|order")


def test_member_not_in_manifest_is_rejected(area):
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    data = craft([*members[:2], regular("k/extra.so", b"x"), members[2]], GOOD)[0]
    rejects(area, data, UnsafeMemberError, "k/extra.so.*not in the manifest")
    data = craft([*members, regular("zz/trailing", b"x")], GOOD)[0]
    rejects(area, data, UnsafeMemberError, "zz/trailing.*not in the manifest")


def test_member_missing_from_bundle_is_rejected(area):
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    rejects(area, craft(members[:2], GOOD)[0], IntegrityError, "z/last.ptx.*missing")


def test_size_mismatch_is_rejected(area):
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    members[2] = regular("z/last.ptx", GOOD["z/last.ptx"] + b"!")
    rejects(area, craft(members, GOOD)[0], IntegrityError, "z/last.ptx.*bytes")


@pytest.fixture(params=["caller", "reader thread"])
def hashed_by(request, monkeypatch) -> str:
    """Who hashes a member depends on load (bundle_reader.Prefetch); force each side in turn."""
    from bundler.bundle import prefetch as bundle_reader

    monkeypatch.setattr(bundle_reader, "_CALLER_BEHIND", 1 << 30 if request.param == "caller" else 0)
    return request.param


@pytest.mark.parametrize("index", [0, 2])
def test_hash_mismatch_leaves_nothing_visible(area, hashed_by, index):
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    name = members[index][0].name
    members[index] = regular(name, b"X" * len(GOOD[name]))
    rejects(area, craft(members, GOOD)[0], IntegrityError, f"{name}.*sha256")


def test_honest_bundle_unpacks_whoever_hashes(area, hashed_by):
    data, digest = honest(GOOD)
    archive.unpack(io.BytesIO(data), area / "dest", expected_digest=digest, settings=SETTINGS)
    assert {n: (area / "dest" / n).read_bytes() for n in GOOD} == GOOD


class _Upper:
    """A rewriter (like Triton's group-file relocation) that must only ever see verified bytes."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def wants(self, name: str) -> bool:
        return name.endswith(".json")

    def __call__(self, name: str, data: bytes, target: Path) -> bytes:
        self.seen.append(data)
        return data.upper()


def test_rewriter_sees_only_verified_members(area, hashed_by):
    data, _ = honest(GOOD)
    rewriter = _Upper()
    archive.unpack(io.BytesIO(data), area / "dest", settings=SETTINGS, rewrite=rewriter)
    assert (area / "dest/k/b.json").read_bytes() == GOOD["k/b.json"].upper()
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    members[1] = regular("k/b.json", b"X" * len(GOOD["k/b.json"]))
    rewriter = _Upper()
    rejects(area, craft(members, GOOD)[0], IntegrityError, "k/b.json.*sha256", rewrite=rewriter)
    assert rewriter.seen == []


def test_requested_digest_must_match(area):
    data, digest = honest(GOOD)
    other = "0" * 64
    rejects(area, data, IntegrityError, other, expected_digest=other)


def test_missing_manifest_is_rejected(area):
    data = zstd(tar_bytes([regular(n, d) for n, d in sorted(GOOD.items())]))
    rejects(area, data, ManifestError, "first member must be MANIFEST.json")


@pytest.mark.parametrize(
    "manifest, words",
    [(b"{not json", "not valid JSON"), (b"[]", "JSON object"), (b'{"format": 99, "files": []}', "format 99"),
     (b'{"format": 1, "files": [{"path": "a"}]}', "malformed"),
     (b'{"format": 1, "files": [{"path": "a", "size": -1, "sha256": "' + b"0" * 64 + b'"}]}', "malformed")],
)
def test_malformed_manifest_is_rejected(area, manifest, words):
    rejects(area, craft([], {}, manifest=manifest)[0], ManifestError, words)


def test_unsorted_manifest_is_rejected(area):
    good = manifest_bytes(GOOD).replace(b'"k/a.cubin"', b'"zz/a.cubin"')
    rejects(area, craft([], {}, manifest=good)[0], ManifestError, "sorted")


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_truncated_stream_is_rejected(area, fraction):
    files = {f"k/{i}.bin": bytes([i]) * 5000 + bytes(range(256)) * i for i in range(40)}
    data, _ = honest(files)
    rejects(area, data[: int(len(data) * fraction)], BundleError, "")


def test_data_that_is_not_zstd_is_rejected(area):
    rejects(area, b"PK\x03\x04 this is a zip, not a bundle" * 20, NotABundleError, "zstd")


def test_zstd_that_is_not_tar_is_rejected(area):
    rejects(area, zstd(b"just some text, not a tar archive " * 100), NotABundleError, "not a bundle")


def test_empty_input_is_rejected(area):
    rejects(area, b"", NotABundleError, "truncated")


def test_data_after_the_archive_is_rejected(area):
    data, _ = honest(GOOD)
    rejects(area, data + zstd(b"appended payload"), NotABundleError, "after the end")


def test_member_limit_is_enforced_before_writing(area):
    data, _ = honest(GOOD)
    rejects(area, data, LimitExceededError, "3 members", settings=Settings(max_members=2))


def test_size_limit_is_enforced_before_writing(area):
    data, _ = honest({"big.bin": bytes(1 << 20)})
    rejects(area, data, LimitExceededError, "over the limit", settings=Settings(max_bundle_bytes=1 << 19))


def test_frame_demanding_a_huge_window_is_rejected(area):
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=30)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as w:
        w.write(tar_bytes([regular("MANIFEST.json", manifest_bytes({}))]))  # size unknown: window stays 1 GiB
    rejects(area, out.getvalue(), NotABundleError, "zstd")


def test_existing_symlink_in_destination_cannot_redirect_writes(area):
    (area / "dest/k").rename(area / "dest/k-real")
    (area / "dest/k").symlink_to(area / "outside", target_is_directory=True)
    data, _ = honest(GOOD)
    rejects(area, data, UnsafeMemberError, "outside")


def test_symlink_inside_destination_that_stays_inside_is_allowed(area):
    (area / "dest/real").mkdir()
    (area / "dest/k").rename(area / "dest/k-old")
    (area / "dest/k").symlink_to(area / "dest/real", target_is_directory=True)
    data, _ = honest(GOOD)
    archive.unpack(io.BytesIO(data), area / "dest", settings=SETTINGS)
    assert (area / "dest/real/a.cubin").read_bytes() == GOOD["k/a.cubin"]


def test_rejected_bundle_leaves_no_new_destination_folder(tmp_path):
    data, _ = honest(GOOD)
    with pytest.raises(IntegrityError):
        archive.unpack(io.BytesIO(data), tmp_path / "new" / "deep", expected_digest="1" * 64, settings=SETTINGS)
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    members[2] = regular("z/last.ptx", b"X" * len(GOOD["z/last.ptx"]))
    with pytest.raises(IntegrityError):
        archive.unpack(io.BytesIO(craft(members, GOOD)[0]), tmp_path / "new" / "deep", settings=SETTINGS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("files", [
    {"k/a.cubin": b"1", "k/a.cubin/inner": b"2"},
    # not neighbours once sorted: '-' sorts before '/'
    {"k/a": b"1", "k/a-b": b"2", "k/a/b": b"3"},
    {"a": b"1", "a-z/x": b"2", "a/b/c": b"3"},
])
def test_file_and_folder_conflict_is_rejected_before_anything_moves(area, files):
    rejects(area, craft([regular(n, d) for n, d in sorted(files.items())], files)[0], UnsafeMemberError,
            "both a file and a folder")


def test_non_canonical_manifest_is_rejected(area):
    spaced = manifest_bytes(GOOD).replace(b",", b", ")
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    rejects(area, craft(members, GOOD, manifest=spaced)[0], ManifestError, "canonical")
    boolean = manifest_bytes({"a": b"x"}).replace(b'"size":1', b'"size":true')
    rejects(area, craft([regular("a", b"x")], {}, manifest=boolean)[0], ManifestError, "malformed")


def test_manifest_larger_than_the_manifest_limit_is_refused_unread(area):
    members = [regular(n, d) for n, d in sorted(GOOD.items())]
    bloated = manifest_bytes(GOOD, producer={"padding": "x" * (2 << 20)})
    data, _ = craft(members, GOOD, manifest=bloated)
    rejects(area, data, LimitExceededError, "MANIFEST.json is .* bytes.*BUNDLER_MAX_MANIFEST_BYTES",
            settings=Settings(max_manifest_bytes=1 << 20))


def test_long_zero_tail_is_not_padding(area):
    data, _ = honest(GOOD)
    archive.unpack(io.BytesIO(data + zstd(bytes(10240))), area / "ok", settings=SETTINGS)  # GNU tar's record
    rejects(area, data + zstd(bytes(1 << 20)), NotABundleError, "after the end")


class _GroupRewriter:
    def wants(self, name: str) -> bool:
        return name.endswith(".json")

    def __call__(self, name: str, data: bytes, target: Path) -> bytes:
        return data


def test_oversized_member_for_the_rewriter_is_refused(area):
    data, _ = honest({"k/__grp__x.json": b"[" * ((1 << 20) + 1)})
    rejects(area, data, LimitExceededError, "__grp__x.json", rewrite=_GroupRewriter())


def test_directory_where_a_file_goes_is_rejected(area):
    (area / "dest/z/last.ptx").mkdir(parents=True)
    data, _ = honest(GOOD)
    rejects(area, data, UnsafeMemberError, "directory")


# --- the ends of the tar and zstd streams (second_eof_block.py, zstd_edges.py, trunc1.tar.zst) ---


def test_a_header_hidden_in_the_second_end_of_archive_block_is_rejected(area):
    """Only the first zero block was checked: a whole member header in the second passed verify,
    and ``tar -i`` (which reads on past zero blocks) extracts it."""
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(packed(GOOD)), read_across_frames=True).read()
    assert tar.endswith(bytes(1024))
    crafted = zstd(tar[:-1024] + bytes(512) + raw_header("evil.py", b"%011o\0" % 0) + bytes(1024))
    rejects(area, crafted, NotABundleError, "second end-of-archive block")
    with pytest.raises(NotABundleError, match="second end-of-archive block"):
        archive.verify(io.BytesIO(crafted), settings=SETTINGS)


def _skippable(payload: bytes, magic: int = 0x184D2A50) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


ZSTD_EDGES = {
    "skippable frame first": (lambda good: _skippable(b"X" * 1000) + good, "skippable"),
    "skippable frame last": (lambda good: good + _skippable(b"J" * (1 << 20), 0x184D2A5F), "skippable"),
    "skippable frame between": (lambda good: good + _skippable(b"") + zstd(bytes(1024)), "skippable"),
    "empty frames appended": (lambda good: good + zstd(b"") * 100, "empty zstd frame"),
    "truncated frame header appended": (lambda good: good + good[:5], "truncated"),
    "half a frame appended": (lambda good: good + zstd(bytes(4096))[:8], "truncated"),
    "truncated by 1 byte (the checksum's last)": (lambda good: good[:-1], "truncated"),
    "truncated by 4 bytes (the whole checksum)": (lambda good: good[:-4], "truncated"),
    "garbage appended": (lambda good: good + b"garbage", "not a zstd frame"),
}


@pytest.mark.parametrize("case", ZSTD_EDGES)
def test_zstd_oddities_around_a_valid_bundle_are_rejected(area, case):
    """python-zstandard's reader stops quietly where its input ends, mid-frame or not, and passes
    over skippable frames: the frames are walked as they are read, and only whole data frames
    that end where the input does make a bundle."""
    make, words = ZSTD_EDGES[case]
    good = packed({"a.txt": b"hello" * 100, "k/b.bin": bytes(range(256)) * 64})
    archive.verify(io.BytesIO(good), settings=SETTINGS)
    data = make(good)
    rejects(area, data, NotABundleError, words)
    with pytest.raises(NotABundleError, match=words):
        archive.verify(io.BytesIO(data), settings=SETTINGS)


def test_frames_split_anywhere_by_the_input_are_walked_the_same(area):
    """The frame walk keeps its place across reads of any size (a header split between two)."""

    class Trickle(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            return super().read(min(size, 3) if size and size > 0 else 3)

    good = packed(GOOD)
    archive.verify(Trickle(good), settings=SETTINGS)
    with pytest.raises(NotABundleError, match="truncated"):
        archive.verify(Trickle(good[:-1]), settings=SETTINGS)
