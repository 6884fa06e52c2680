"""Member order in the tar stream: extension, then path (format 2), while format 1 (path order) still reads.

The manifest stays sorted by path; :func:`manifest.stream_order` alone says where each member goes in
the stream, the writer emits exactly that and the reader requires exactly that, per format version.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from bundler.bundle import archive, manifest, tarformat
from bundler.bundle.manifest import FORMAT_VERSION, MANIFEST_NAME, FileRecord
from bundler.config import Settings
from bundler.errors import BundleError, IntegrityError, ManifestError, UnsafeMemberError

from bundles import snapshot, write_tree

SETTINGS = Settings(zstd_threads=1)
REPO = Path(__file__).resolve().parents[1]

#: Written by kernel-bundler before format 2 (commit a706c4f, ``archive.pack`` of ``V1_FILES`` with
#: ``Settings(zstd_threads=1)`` and ``V1_PRODUCER``): members in path order, manifest format 1.
V1_FILES = {
    "triton/K1/k.cubin": b"\x7fELF" + bytes(range(64)) * 4,
    "triton/K1/k.json": b'{"num_warps": 4}',
    "triton/K1/k.ptx": b".version 8.0\n.target sm_90\n",
    "triton/K0/k.cubin": b"\x7fELF" + bytes(range(64)) * 3,
    "triton/K0/.lock": b"",
    "inductor/fxgraph/entry": b"\x80\x04\x95graph",
    "inductor/output_code/c.tar.gz": b"gz",
}
V1_PRODUCER = {"bundler": "0.x (format 1)"}
V1_DIGEST = "95c13ea27e201ec762737e3170e8251a811a37412fcf7bc2ccc90b635f10de77"
V1_BUNDLE = base64.b64decode(
    "KLUv/WQABfUQAGbpcSEwcdqMoqztVm/nMUKbWolOQ7LjcZZLQktC4n/8wGBgUMVxAGYAXwAvQ0I5jtN0kReztJgK5erk1f7mV/dt"
    "fVb26pq/6/LWVH8zdf7kzG/qRI6u5AjKcRwMppk8SIQFMxAXD2GWxituIjmRE9GwxdFoiBzKo5D80UAAhhtKBQMA1kJEuhZCAKUU"
    "ERFgslAkHgwLBQYHCgQJAZ2rsUa7axW7SturVD2kHrNUuf2621x9P69CjvzbplKOnd6ELxQPCCJAJksjYZrU1O0uLVUIu/Oh9s01"
    "UqntmjrX6LthS5qLDz1zJ2+06Fml5V5mQDwYbh4OeW7xh6Zi0VQWx0aLnCk5lZL75rRI3/pCkUDNxMTm3O8y4SZmr2pZa2x5srfn"
    "CiWH36p3N9FCd7q6dqlX/W8hXcTY226ZOzGZXfu/lRxzH0vrzMlZPlNlZwuh9TDRl2tbzz+tNJF0xR8TuFYLGxtnAAUIBFw88EQO"
    "8yjcpNJHI3KY5xW3MBbHgSKn4Qpm+eNw2GCpj1Uqa2fufdvUiTp5qkKskr5NvRBzbVeouVrLkGLqE2vPiBL1orFIloy1tIqJnmrK"
    "OLXHb09Tb6KzthxL6Fh7jCkDHwAPAjItTGoUAIpIBzdpAwAA2KjN4UB1AGhxB+WzPVu24gCgmTpwCz4DoIjmwCswAkBhBIy7AT14"
    "CAHKijekdvkERtg81Ag3CVpBADcc3ESBBCgBz9IBRCi1L/0EcGULALKPOSqw3rgY/KD/QE2LQdYirfdRsCEt6g/6uyY+mPDxRit7"
    "c0yiHPVQT9gUGAnWRxsqvLRnypyO1qPouvgLs3cTKc1qTWkwnuTksRcJC8HM4WyofbEdm2k/PQ5r5rSzhWVFJYU0EoW0zFY6LyPK"
    "iUkJyYhICMiHB9ZxcWxoZGBcWFRQTEhEQDw4NDAsKCQgWAcGBQQDIIEAgOolxqXnn/b1fjK7i6css/+pwzZRHkZerL+sQ5qt9Dqm"
    "mDkdO+mVcLfpDeqNf0A+f5U5He5flfZK5/z/W6v9f5WT9fUkDchlU2pGZqy7XbpfLiAAAxERmakH1pV/sHJujA2g6iBtLu2A9xvh"
    "ZRX4c2tsACrZTUcQAjANAanQASWAYoAVOmF4gKkAORUIPzQ1ZANSnc5BnnYA4DA2gCrVHTiBJJ+KdtQ1dKF2bIBVosNKEg9AA4Iq"
    "FA1a9BDYj+1wSwFABjAkYiAeHodbDINjLlPR2QQRyohM"
)


def bundle_in_order(files, order, *, fmt=FORMAT_VERSION, producer=None, settings=SETTINGS):
    """A bundle of ``files`` declaring format ``fmt``, members written in ``order`` (names may repeat
    or be left out), framed exactly as ``writer.packed`` frames it: manifest frame, member frame."""
    records = [FileRecord(n, len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()]
    built = manifest.build(records, producer or {"bundler": "test"})
    man = manifest.Manifest(built.files, built.producer, format=fmt)
    encoded = man.encode()

    def member(name: str, data: bytes) -> bytes:
        return tarformat.file_header(name, len(data)) + data + bytes(tarformat.padding(len(data)))

    head = archive.compressor(settings).compress(member(MANIFEST_NAME, encoded))
    body = io.BytesIO()
    with archive.compressor(settings).stream_writer(body, closefd=False) as writer:
        writer.write(b"".join(member(n, files[n]) for n in order) + tarformat.END_OF_ARCHIVE)
    return head + body.getvalue(), man.digest


def pack_v1(files, **kwargs):
    """What the previous writer wrote: path order, format 1."""
    return bundle_in_order(files, sorted(files), fmt=1, **kwargs)


def tar_names(data: bytes) -> list[str]:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getnames()


def pack_bytes(source, **kwargs):
    out = io.BytesIO()
    result = archive.pack(source, out, settings=SETTINGS, **kwargs)
    return out.getvalue(), result


def _tree(root: Path, files) -> Path:
    write_tree(root, files)
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bundler.cli", *args], capture_output=True, timeout=120)


# --- the order itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, ext",
    [("k/a.cubin", "cubin"), ("a.json", "json"), ("k/a.tar.gz", "gz"), ("fx/fz/entry", ""), ("k/.lock", ""),
     ("k/.a.json", "json"), ("k/a.", ""), ("k.d/entry", ""), ("k/..x", "x"), ("k/A.PTX", "PTX")],
)
def test_extension_is_the_text_after_the_last_dot_of_the_name(path, ext):
    assert manifest.extension(path) == ext


def test_stream_order_is_extension_then_path_and_the_manifest_stays_by_path():
    man = manifest.build([FileRecord(n, len(d), hashlib.sha256(d).hexdigest()) for n, d in V1_FILES.items()])
    assert man.format == FORMAT_VERSION == 2
    assert [r.path for r in man.files] == sorted(V1_FILES)
    assert [r.path for r in manifest.stream_order(man)] == [
        "inductor/fxgraph/entry", "triton/K0/.lock", "triton/K0/k.cubin", "triton/K1/k.cubin",
        "inductor/output_code/c.tar.gz", "triton/K1/k.json", "triton/K1/k.ptx",
    ]
    assert manifest.stream_order(manifest.Manifest(man.files, man.producer, format=1)) == man.files


def test_writer_emits_the_stream_order_from_a_tree_and_a_mapping(tmp_path):
    write_tree(tmp_path / "src", V1_FILES)
    from_tree, result = pack_bytes(tmp_path / "src")
    from_mapping, _ = pack_bytes(dict(reversed(list(V1_FILES.items()))))
    assert from_tree == from_mapping  # deterministic whatever the discovery order
    assert result.manifest.format == FORMAT_VERSION
    expected = [MANIFEST_NAME, *(r.path for r in manifest.stream_order(result.manifest))]
    assert tar_names(from_tree) == expected == [MANIFEST_NAME, *sorted(V1_FILES, key=manifest.stream_key)]
    assert expected[1:] != sorted(V1_FILES)  # the test means something: the two orders differ
    again, _ = pack_bytes(tmp_path / "src")
    assert again == from_tree
    written, written_result = pack_bytes(V1_FILES, producer={"bundler": "test"})
    assert bundle_in_order(V1_FILES, expected[1:]) == (written, written_result.digest)  # the helper is faithful


# --- format 1 still reads -----------------------------------------------------------------------


def test_a_format_1_bundle_of_the_previous_release_still_reads(tmp_path):
    man = archive.verify(io.BytesIO(V1_BUNDLE), expected_digest=V1_DIGEST, settings=SETTINGS)
    assert man.format == 1 and man.digest == V1_DIGEST and dict(man.producer) == V1_PRODUCER
    assert archive.read_manifest(io.BytesIO(V1_BUNDLE), settings=SETTINGS).digest == V1_DIGEST
    archive.unpack(io.BytesIO(V1_BUNDLE), tmp_path / "dest", expected_digest=V1_DIGEST, settings=SETTINGS)
    assert snapshot(tmp_path / "dest") == snapshot(_tree(tmp_path / "want", V1_FILES))
    files = list(archive.iter_files(io.BytesIO(V1_BUNDLE), expected_digest=V1_DIGEST, settings=SETTINGS))
    assert [(r.path, d) for r, d in files] == sorted(V1_FILES.items())


def test_the_test_helper_writes_what_the_previous_release_wrote():
    assert pack_v1(V1_FILES, producer=V1_PRODUCER) == (V1_BUNDLE, V1_DIGEST)


def test_the_cli_verifies_inspects_and_unpacks_format_1(tmp_path):
    bundle = tmp_path / "v1.tar.zst"
    bundle.write_bytes(V1_BUNDLE)
    result = cli("verify", str(bundle), "--digest", V1_DIGEST)
    assert result.returncode == 0 and result.stdout.decode().startswith(f"ok {V1_DIGEST} 7 files"), result.stderr
    doc = json.loads(cli("inspect", str(bundle), "--json").stdout)
    assert doc["format"] == 1 and doc["digest"] == V1_DIGEST
    assert [f["path"] for f in doc["file_list"]] == sorted(V1_FILES)
    result = cli("unpack", str(bundle), "--into", str(tmp_path / "dest"), "--digest", V1_DIGEST)
    assert result.returncode == 0, result.stderr
    assert {n: (tmp_path / "dest" / n).read_bytes() for n in V1_FILES} == V1_FILES


def test_a_real_cache_in_format_1_reads_and_repacks_smaller_or_equal(tmp_path):
    with tarfile.open(REPO / "tests/fixtures/triton_autotune_caches.tar.gz") as tar:
        tar.extractall(tmp_path / "src", filter="data")
    files = {p.relative_to(tmp_path / "src").as_posix(): p.read_bytes()
             for p in sorted((tmp_path / "src").rglob("*")) if p.is_file()}
    settings = Settings()
    v1, v1_digest = pack_v1(files, settings=settings)
    archive.unpack(io.BytesIO(v1), tmp_path / "dest", expected_digest=v1_digest, settings=settings)
    assert {n: (tmp_path / "dest" / n).read_bytes() for n in files} == files
    v2, result = pack_bytes(tmp_path / "src", producer={"bundler": "test"})
    assert result.digest != v1_digest  # the format is part of the manifest, so of the digest
    assert len(v2) <= len(v1)


# --- refusals ---------------------------------------------------------------------------------------


GOOD = {"a/x.ptx": b".version 8.0", "b/y.cubin": b"\x7fELF" * 50, "c/z.cubin": b"\x7fELF" * 60, "d/entry": b"pkl"}
STREAM = sorted(GOOD, key=manifest.stream_key)  # d/entry, b/y.cubin, c/z.cubin, a/x.ptx
PATHS = sorted(GOOD)


@pytest.mark.parametrize(
    "fmt, order, error, match",
    [
        (2, PATHS, UnsafeMemberError, "'a/x.ptx' appears twice or out of order .*format 2.*extension, then path"),
        (1, STREAM, UnsafeMemberError, "'d/entry' appears twice or out of order .*format 1.*path order"),
        (2, [STREAM[0], STREAM[2], STREAM[1], STREAM[3]], UnsafeMemberError, "'c/z.cubin'.*out of order"),
        (2, [STREAM[0], STREAM[1], STREAM[1], STREAM[2], STREAM[3]], UnsafeMemberError, "'b/y.cubin'.*twice"),
        (2, [*STREAM, STREAM[0]], UnsafeMemberError, "'d/entry'.*twice"),
        (2, STREAM[:3], IntegrityError, "'a/x.ptx'.*missing"),
        (2, [STREAM[0], *STREAM[2:]], UnsafeMemberError, "'c/z.cubin'.*out of order"),
        (1, [*PATHS[:2], PATHS[1], *PATHS[2:]], UnsafeMemberError, "'b/y.cubin'.*twice"),
    ],
    ids=["v2-in-path-order", "v1-in-stream-order", "v2-swapped-within-an-extension", "v2-twice",
         "v2-twice-at-the-end", "v2-missing-last", "v2-missing-one", "v1-twice"],
)
def test_members_away_from_the_declared_order_are_refused(tmp_path, fmt, order, error, match):
    data, digest = bundle_in_order(GOOD, order, fmt=fmt)
    _tree(tmp_path / "dest", {"k/existing.txt": b"keep me"})
    before = snapshot(tmp_path)
    with pytest.raises(error, match=match):
        archive.unpack(io.BytesIO(data), tmp_path / "dest", expected_digest=digest, settings=SETTINGS)
    assert snapshot(tmp_path) == before
    with pytest.raises(error, match=match):
        archive.verify(io.BytesIO(data), expected_digest=digest, settings=SETTINGS)


@pytest.mark.parametrize("fmt, order", [(1, PATHS), (2, STREAM)])
def test_members_in_the_declared_order_read(tmp_path, fmt, order):
    data, digest = bundle_in_order(GOOD, order, fmt=fmt)
    assert archive.unpack(io.BytesIO(data), tmp_path / "dest", expected_digest=digest, settings=SETTINGS).format == fmt
    assert {n: (tmp_path / "dest" / n).read_bytes() for n in GOOD} == GOOD


@pytest.mark.parametrize("fmt", [0, 3, 99, -1, True, "2", 2.0, None])
def test_unknown_formats_are_refused_before_any_member(tmp_path, fmt):
    doc = {"files": [], "format": fmt, "producer": {}}
    encoded = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    body = tarformat.file_header(MANIFEST_NAME, len(encoded)) + encoded + bytes(tarformat.padding(len(encoded)))
    data = archive.compressor(SETTINGS).compress(body + tarformat.END_OF_ARCHIVE)
    shown = re.escape(repr(fmt))
    with pytest.raises(ManifestError, match=f"has format {shown}; this kernel-bundler reads formats 1 to 2. Upgrade"):
        archive.unpack(io.BytesIO(data), tmp_path / "dest", settings=SETTINGS)
    assert not (tmp_path / "dest").exists()


def test_bad_order_is_a_bundle_error_for_the_cli(tmp_path):
    data, digest = bundle_in_order(GOOD, PATHS, fmt=2)
    bundle = tmp_path / "b.tar.zst"
    bundle.write_bytes(data)
    result = cli("verify", str(bundle), "--digest", digest)
    assert result.returncode == BundleError.exit_code
    assert b"out of order" in result.stderr


# --- what the order is for ----------------------------------------------------------------------


@pytest.mark.slow
def test_max_autotune_corpus_is_at_most_half_of_tar_zstd(tmp_path):
    """Issue 12: the bundle of the max-autotune-shaped corpus is at most half of ``tar | zstd -3``.

    The full-size corpus on purpose: scaled-down ones fit zstd's window in either order, and pass
    in path order too (a 60-kernel corpus: 2.4x), where the full one did not (1.79x).
    """
    if not (shutil.which("tar") and shutil.which("zstd")):
        pytest.fail("needs the tar and zstd commands for the reference size (apt-get install tar zstd), as the GNU tar interop test does")
    spec = importlib.util.spec_from_file_location("corpus", REPO / "benchmarks" / "corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)  # type: ignore[union-attr]
    root = tmp_path / "corpus"
    corpus.make_max_autotune_corpus(root)
    reference = subprocess.run("tar -cf - . | zstd -T0 -3", shell=True, cwd=root, capture_output=True, check=True)
    out = io.BytesIO()
    archive.pack(root, out, settings=Settings())
    assert len(out.getvalue()) * 2 <= len(reference.stdout), (len(out.getvalue()), len(reference.stdout))
