"""Sizes, counts and shapes from a hostile stream: each is refused promptly, with bounded memory.

A reader that trusts a number from the stream can loop forever (a negative tar size made every
reader spin while allocating), parse its way into gigabytes (a manifest of a million empty lists)
or stage hundreds of megabytes from a few kilobytes (a zstd bomb). Every case here runs under a
deadline, through the public paths (``archive`` and the ``bundler`` command), so a regression
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from bundler.bundle import archive
from bundler.bundle.prefetch import Prefetch
from bundler.bundle.reader import events
from bundler.config import Settings
from bundler.errors import BundleError, LimitExceededError, ManifestError, NotABundleError, UnsafeMemberError

from bundles import (
    honest,
    manifest_bytes,
    pax_record,
    raw_bundle,
    raw_member,
    raw_pax,
    snapshot,
    write_tree,
)

SETTINGS = Settings(zstd_threads=1)
DEADLINE = 20.0
REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable


def within(seconds: float, call: Callable[[], object]) -> object:
    """Run ``call`` in a thread and fail the test if it does not finish in time (a hang is a bug)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed back to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: the reader does not stop on this input")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


# Every way a reader is used; each must refuse the same bytes, and none may hang.
READERS = {
    "unpack": lambda data, dest: archive.unpack(io.BytesIO(data), dest, settings=SETTINGS),
    "verify": lambda data, dest: archive.verify(io.BytesIO(data), settings=SETTINGS),
    "read_manifest": lambda data, dest: archive.read_manifest(io.BytesIO(data), settings=SETTINGS),
    "iter_files": lambda data, dest: list(archive.iter_files(io.BytesIO(data), settings=SETTINGS)),
}


def refused(tmp_path: Path, data: bytes, error: type[BundleError], match: str, readers=READERS) -> None:
    write_tree(tmp_path / "dest", {"keep.txt": b"keep"})
    before = snapshot(tmp_path)
    for name, read in readers.items():
        with pytest.raises(error, match=match):
            within(DEADLINE, lambda read=read: read(data, tmp_path / "dest"))
        assert snapshot(tmp_path) == before, name


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [PYTHON, "-m", "bundler", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def refused_by_cli(tmp_path: Path, data: bytes, words: str) -> None:
    """``inspect``, ``verify`` and ``unpack`` exit 4 (a rejected bundle) with one line, not a traceback."""
    path = tmp_path / "hostile.tar.zst"
    path.write_bytes(data)
    for command in (["inspect", str(path)], ["verify", str(path)], ["unpack", str(path), "--into", str(tmp_path / "out")]):
        result = cli(*command, cwd=tmp_path)
        assert result.returncode == 4, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bundler: error:"), result.stderr
        assert words in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


# --- sizes in tar headers ------------------------------------------------------------------------

FILES = {"k/a.bin": b"kernel bytes"}
MANIFEST = manifest_bytes(FILES)

BAD_SIZE_FIELDS = [
    b"-0000000001\0",  # the reported hang: int(..., 8) takes the sign
    b"-1\0",
    b" -1\0",
    b"+0000000001\0",
    b"0000 000001\0",  # a space inside the digits
    b"0000_000001\0",  # int() accepts underscores
    b"0000000008\0",  # not an octal digit
    b"00000000001x",
]


@pytest.mark.parametrize("field", BAD_SIZE_FIELDS, ids=repr)
def test_malformed_size_on_the_manifest_is_refused_by_every_reader(tmp_path, field):
    data = raw_bundle(raw_member("MANIFEST.json", MANIFEST, size_field=field), raw_member("k/a.bin", FILES["k/a.bin"]))
    refused(tmp_path, data, NotABundleError, "malformed size field")


@pytest.mark.parametrize("field", BAD_SIZE_FIELDS[:3], ids=repr)
def test_malformed_size_on_a_member_is_refused(tmp_path, field):
    data = raw_bundle(raw_member("MANIFEST.json", MANIFEST), raw_member("k/a.bin", FILES["k/a.bin"], size_field=field))
    refused(tmp_path, data, NotABundleError, "malformed size field", readers={"unpack": READERS["unpack"]})


def test_negative_size_is_a_clean_rejection_on_the_command_line(tmp_path):
    data = raw_bundle(raw_member("MANIFEST.json", MANIFEST, size_field=b"-0000000001\0"))
    refused_by_cli(tmp_path, data, "malformed size field")


@pytest.mark.parametrize("value", ["-1", "+12", " 12", "1_2", "12 ", "0x10", "1" * 30, ""], ids=repr)
@pytest.mark.parametrize("on", ["MANIFEST.json", "k/a.bin"])
def test_pax_size_must_be_plain_decimal_digits(tmp_path, value, on):
    parts = [raw_member("MANIFEST.json", MANIFEST), raw_member("k/a.bin", FILES["k/a.bin"])]
    index = 0 if on == "MANIFEST.json" else 1
    parts.insert(index, raw_pax(pax_record("size", value)))
    refused(tmp_path, raw_bundle(*parts), NotABundleError, "not a plain decimal number|malformed pax",
            readers={"unpack": READERS["unpack"], "read_manifest": READERS["read_manifest"]} if index == 0
            else {"unpack": READERS["unpack"]})


def test_negative_pax_size_is_a_clean_rejection_on_the_command_line(tmp_path):
    data = raw_bundle(raw_pax(pax_record("size", "-1")), raw_member("MANIFEST.json", MANIFEST))
    refused_by_cli(tmp_path, data, "not a plain decimal number")


@pytest.mark.parametrize("records", [
    b"0 path=x\n",  # a zero length would never move forward
    b"-5 path=x\n",
    b"+11 path=x\n",
    b"999 path=k/a.bin\n",  # longer than the header that holds it
    b"3 path=k/a.bin\n",  # shorter than its own length field
    b"12345678901234567890123 p=\n",
    pax_record("path", "k/a.bin") + pax_record("path", "k/a.bin"),
])
def test_malformed_pax_records_are_refused(tmp_path, records):
    data = raw_bundle(raw_member("MANIFEST.json", MANIFEST), raw_pax(records), raw_member("k/a.bin", FILES["k/a.bin"]))
    refused(tmp_path, data, NotABundleError, "pax", readers={"unpack": READERS["unpack"]})


def test_pax_path_and_size_still_work(tmp_path):
    data = raw_bundle(
        raw_member("MANIFEST.json", MANIFEST),
        raw_pax(pax_record("path", "k/a.bin") + pax_record("size", str(len(FILES["k/a.bin"]))) + pax_record("mtime", "1.5")),
        raw_member("stub", FILES["k/a.bin"]),
    )
    within(DEADLINE, lambda: archive.unpack(io.BytesIO(data), tmp_path / "dest", settings=SETTINGS))
    assert (tmp_path / "dest/k/a.bin").read_bytes() == FILES["k/a.bin"]


# --- the manifest's JSON -------------------------------------------------------------------------


def _with_manifest(text: bytes) -> bytes:
    return raw_bundle(raw_member("MANIFEST.json", text))


SHA = "0" * 64
HOSTILE_MANIFESTS = {
    "lone surrogate in a path": (
        b'{"files":[{"path":"k/\\ud800","sha256":"' + SHA.encode() + b'","size":1}],"format":1,"producer":{}}',
        UnsafeMemberError, "not valid UTF-8"),
    "lone surrogate in producer": (b'{"files":[],"format":1,"producer":{"a":"\\udc80"}}', ManifestError, "producer"),
    "huge integer size": (
        b'{"files":[{"path":"k/a","sha256":"' + SHA.encode() + b'","size":' + b"9" * 5000 + b"}],"
        b'"format":1,"producer":{}}', ManifestError, "digits"),
    "huge integer format": (b'{"files":[],"format":' + b"1" * 100000 + b',"producer":{}}', ManifestError, "digits"),
    "deep nesting": (b'{"files":' + b"[" * 3000 + b"]" * 3000 + b',"format":1,"producer":{}}',
                     ManifestError, "nested too deeply"),
    "deeper nesting": (b'{"files":' + b"[" * 100000 + b"]" * 100000 + b',"format":1,"producer":{}}',
                       ManifestError, "JSON values"),
    "deep nesting in producer": (b'{"files":[],"format":1,"producer":{"a":' + b"[" * 900 + b"]" * 900 + b"}}",
                                 ManifestError, "producer"),
    "1000-level path": (
        b'{"files":[{"path":"' + "/".join(["d"] * 1000).encode() + b'","sha256":"' + SHA.encode()
        + b'","size":1}],"format":1,"producer":{}}', UnsafeMemberError, "longer than|levels deep"),
    "path 32 levels deep": (
        b'{"files":[{"path":"' + "/".join(["d"] * 33).encode() + b'","sha256":"' + SHA.encode()
        + b'","size":1}],"format":1,"producer":{}}', UnsafeMemberError, "levels deep"),
    "non-hex sha256": (b'{"files":[{"path":"a","sha256":"' + b"Z" * 64 + b'","size":1}],"format":1,"producer":{}}',
                       ManifestError, "malformed file entry 0"),
    "entry that is a list": (b'{"files":[[1,2]],"format":1,"producer":{}}', ManifestError, "entry 0: a list"),
}


@pytest.mark.parametrize("name", HOSTILE_MANIFESTS)
def test_hostile_manifest_json_is_a_bundle_error(tmp_path, name):
    text, error, words = HOSTILE_MANIFESTS[name]
    refused(tmp_path, _with_manifest(text), error, words,
            readers={"read_manifest": READERS["read_manifest"], "unpack": READERS["unpack"]})


@pytest.mark.parametrize("name", ["lone surrogate in a path", "huge integer size", "deep nesting", "1000-level path"])
def test_hostile_manifest_json_exits_4_on_the_command_line(tmp_path, name):
    text, _error, words = HOSTILE_MANIFESTS[name]
    refused_by_cli(tmp_path, _with_manifest(text), words.split("|")[0])


def test_a_flood_of_tiny_json_values_is_refused_before_it_is_parsed(tmp_path):
    """Two bytes per empty list: parsing 4 MB of them would build ~2 million lists (~120 MB)."""
    flood = b'{"files":[],"format":1,"producer":{},"x":[' + b"[]," * ((4 << 20) // 3) + b"[]]}"
    data = _with_manifest(flood)
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match="JSON values"):
            within(DEADLINE, lambda: archive.read_manifest(io.BytesIO(data), settings=SETTINGS))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(flood), peak


def test_an_unterminated_string_of_escaped_quotes_is_refused(tmp_path):
    """Guards the value count of ``manifest._check_shape`` against quadratic time.

    ``"\\",\\",...``: an unterminated string of escaped quotes and commas (the reviewer's
    regex_quadratic.py). The comma count is over the value limit, so the count outside strings
    runs; the string pattern it used failed at every ``"`` after scanning to the end, so these
    210 KB (a 113-byte bundle) held ``verify``, ``unpack`` and ``pull`` for over a minute. It is
    refused as the invalid JSON it is, by every reader, without a deadline to save the suite.
    """
    text = b'"' + b'\\",' * 70_000
    data = _with_manifest(text)
    with pytest.raises(ManifestError, match="not valid JSON"):
        archive.read_manifest(io.BytesIO(data), settings=SETTINGS)
    with pytest.raises(ManifestError, match="not valid JSON"):
        archive.unpack(io.BytesIO(data), tmp_path / "dest", settings=SETTINGS)
    assert not (tmp_path / "dest").exists()


def test_a_value_flood_after_strings_with_escaped_quotes_is_still_counted(tmp_path):
    """The count outside strings ends each string at its real closing quote, escapes included."""
    flood = b'{"files":[],"format":1,"producer":{},"s":"\\"\\\\","x":[' + b"[]," * 100_000 + b"[]]}"
    with pytest.raises(ManifestError, match="JSON values"):
        archive.read_manifest(io.BytesIO(_with_manifest(flood)), settings=SETTINGS)


def test_oversized_manifest_is_refused_unread_by_default(tmp_path):
    """A small bundle claiming a 48 MiB manifest: refused from its header, before reading it."""
    huge = manifest_bytes({}, producer={"pad": " " * (48 << 20)})
    data = _with_manifest(huge)
    assert len(data) < (1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError, match="BUNDLER_MAX_MANIFEST_BYTES"):
            within(DEADLINE, lambda: archive.read_manifest(io.BytesIO(data), settings=Settings()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (16 << 20), peak
    # the same bundle is readable once the limit is raised on purpose
    man = archive.read_manifest(io.BytesIO(data), settings=Settings(max_manifest_bytes=64 << 20, max_ratio=1 << 19))
    assert man.files == ()


def test_real_manifests_pass_the_value_bound():
    files = {f"triton/{i:064x}/triton_poi_fused_add_{i}.cubin": b"" for i in range(5000)}
    text = manifest_bytes(files)
    man = archive.read_manifest(io.BytesIO(_with_manifest(text)), settings=SETTINGS)
    assert len(man.files) == 5000
    tiny = manifest_bytes({f"{i}": b"" for i in range(20000)}, producer={f"f{i}": "" for i in range(500)})
    assert len(archive.read_manifest(io.BytesIO(_with_manifest(tiny)), settings=SETTINGS).files) == 20000


# --- decompression bombs -------------------------------------------------------------------------


def _bomb(size: int, sha256: str) -> bytes:
    man = json.dumps(
        {"files": [{"path": "k/zeros.bin", "sha256": sha256, "size": size}], "format": 1, "producer": {}},
        sort_keys=True, separators=(",", ":"),
    ).encode()
    return raw_bundle(raw_member("MANIFEST.json", man), raw_member("k/zeros.bin", bytes(size)))


def test_zstd_bomb_is_refused_while_streaming(tmp_path):
    """A few KB that inflate to 128 MB of zeros behind a wrong hash: stopped by the ratio long before
    the hash check (which would only come after staging all of it)."""
    data = _bomb(128 << 20, "1" * 64)
    assert len(data) < 16 << 10
    write_tree(tmp_path / "dest", {"keep.txt": b"keep"})
    before = snapshot(tmp_path)
    started = time.monotonic()
    with pytest.raises(LimitExceededError, match="BUNDLER_MAX_RATIO"):
        within(DEADLINE, lambda: archive.unpack(io.BytesIO(data), tmp_path / "dest", settings=SETTINGS))
    assert time.monotonic() - started < 2.0
    assert snapshot(tmp_path) == before
    # Raising the limit on purpose lets the same stream through to the hash check.
    with pytest.raises(BundleError, match="sha256"):
        archive.verify(io.BytesIO(data), settings=Settings(max_ratio=1_000_000))


def test_zero_heavy_small_bundles_are_not_bombs(tmp_path):
    size = 6 << 20  # under the 8 MiB floor: expands ~30,000x, and is still a plausible cache
    data = _bomb(size, hashlib.sha256(bytes(size)).hexdigest())
    man = archive.unpack(io.BytesIO(data), tmp_path / "dest", settings=SETTINGS)
    assert man.total_size == size == (tmp_path / "dest/k/zeros.bin").stat().st_size


# --- pack refuses what unpack would refuse -------------------------------------------------------


@pytest.mark.parametrize("name, words", [
    ("/".join(["d"] * 40) + "/f", "levels deep"),
    ("/".join(["d" * 200] * 6) + "/f", "longer than 1024 bytes"),
    ("k/" + "x" * 256, "component longer than 255"),
])
def test_pack_refuses_names_unpack_cannot_place(tmp_path, name, words):
    with pytest.raises(UnsafeMemberError, match=words):
        archive.pack({name: b"x"}, io.BytesIO(), settings=SETTINGS)
    deep = tmp_path / "tree"
    try:
        write_tree(deep, {name: b"x"})
    except OSError:
        return  # the filesystem itself refuses it
    with pytest.raises(UnsafeMemberError, match=f"cannot pack .*{words}"):
        archive.pack(deep, io.BytesIO(), settings=SETTINGS)


def test_pack_refuses_a_file_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    try:
        with open(os.path.join(os.fsencode(root), b"bad-\xff.bin"), "wb") as f:
            f.write(b"x")
    except OSError:
        pytest.skip("this filesystem refuses names that are not UTF-8")
    out = io.BytesIO()
    with pytest.raises(UnsafeMemberError, match="not valid UTF-8"):
        archive.pack(root, out, settings=SETTINGS)


def test_pack_applies_the_readers_member_and_size_limits(tmp_path):
    files = {f"k/{i}": b"x" * 10 for i in range(5)}
    with pytest.raises(LimitExceededError, match="BUNDLER_MAX_MEMBERS"):
        archive.pack(files, io.BytesIO(), settings=Settings(zstd_threads=1, max_members=4))
    with pytest.raises(LimitExceededError, match="BUNDLER_MAX_BUNDLE_BYTES"):
        archive.pack(files, io.BytesIO(), settings=Settings(zstd_threads=1, max_bundle_bytes=30))


def test_deepest_and_longest_allowed_names_pack_and_unpack(tmp_path):
    files = {"/".join(["d"] * 31) + "/f": b"deep", "/".join(["n" * 200] * 4) + "/" + "f" * 200: b"long"}
    out = io.BytesIO()
    result = archive.pack(files, out, settings=SETTINGS)
    archive.unpack(io.BytesIO(out.getvalue()), tmp_path / "dest", expected_digest=result.digest, settings=SETTINGS)
    assert {n: (tmp_path / "dest" / n).read_bytes() for n in files} == files


# --- the reader thread stops when its consumer gives up ------------------------------------------


class _Trickle(io.RawIOBase):
    """A bundle arriving slowly, recording how much was read: an honest stream, just slow."""

    def __init__(self, data: bytes, piece: int = 64 << 10, delay: float = 0.005) -> None:
        super().__init__()
        self._data, self._piece, self._delay, self.taken = data, piece, delay, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        time.sleep(self._delay)
        n = self._piece if size < 0 else min(size, self._piece)
        chunk = self._data[self.taken : self.taken + n]
        self.taken += len(chunk)
        return chunk


def _settled(source: _Trickle) -> int:
    """How much the reader took in the end, once it stopped taking more (or the deadline passed)."""
    deadline = time.monotonic() + 5
    taken = -1
    while source.taken != taken and time.monotonic() < deadline:
        taken = source.taken
        time.sleep(0.3)
    return source.taken


@pytest.fixture(scope="module")
def big_bundle() -> bytes:
    """12 MB that does not compress: the reader needs ~12 decompressed chunks to get through it."""
    return honest({f"k/{i:05}.bin": os.urandom(2048) for i in range(6000)})[0]


def test_closed_prefetch_stops_reading_promptly(big_bundle):
    source = _Trickle(big_bundle)
    prefetch = Prefetch(events(source, SETTINGS), share_hashing=True)
    assert next(iter(prefetch))[0] == 0  # the manifest
    at_close = source.taken
    started = time.monotonic()
    prefetch.close()
    assert time.monotonic() - started < 2.0
    assert _settled(source) - at_close < (3 << 20), "the reader thread kept decompressing after close()"


def test_abandoned_iteration_stops_the_reader(big_bundle):
    """A consumer that leaves the loop (``break``, an exception) without close(): the worker must not
    run on until the queue is full (8 MB here) and then hang there for good."""
    source = _Trickle(big_bundle)
    prefetch = Prefetch(events(source, SETTINGS))
    iterator = iter(prefetch)
    next(iterator)
    at_exit = source.taken
    iterator.close()  # what leaving a `for` loop over it does
    assert _settled(source) - at_exit < (3 << 20)
