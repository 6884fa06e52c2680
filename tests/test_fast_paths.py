"""The shortcuts taken for speed give exactly what the general code gives.

Each fast path (tar headers built from two fields, the reader's byte comparison of a header,
reused chunk buffers, column-wise manifest checks, one string format per manifest entry) is
checked here against the code it stands in for, on inputs that take it and inputs that do not.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random

import pytest

from bundler.bundle import archive, manifest, reader, tarformat
from bundler.bundle.manifest import FileRecord, Manifest
from bundler.config import Settings
from bundler.errors import BundlerError

from bundles import packed, raw_bundle, raw_member

SETTINGS = Settings(zstd_threads=1)
_ALPHABET = [chr(c) for c in range(1, 128)] + ["é", "日", "\U0001f600", '"', "\\", "\u2028"]


def _general_header(path: str, size: int) -> bytes:
    """What ``file_header`` built for every header before its fast path: the generic fields."""
    return tarformat._header(path.encode(), size, b"0")


@pytest.mark.parametrize("seed", range(5))
def test_plain_file_header_is_the_generic_one(seed):
    rnd = random.Random(seed)
    for _ in range(2000):
        path = "".join(rnd.choice([chr(c) for c in range(1, 128)]) for _ in range(rnd.choice([1, 37, 99, 100])))
        size = rnd.choice([0, 1, 511, 512, rnd.randrange(1 << 33), 8**11 - 1])
        block = tarformat.file_header(path, size)
        assert block == _general_header(path, size)
        parsed = tarformat.parse_header(block)
        assert (parsed.name, parsed.size) == (path, size)


def test_headers_the_fast_path_leaves_alone_still_carry_pax_records():
    for path, size in (("a" * 101, 5), ("k/é.bin", 5), ("k/a.bin", 8**11)):
        block = tarformat.file_header(path, size)
        assert tarformat.parse_header(block[:512]).typeflag == b"x"


def test_a_valid_header_that_is_not_ours_is_parsed_and_accepted(tmp_path):
    """A header our writer would not make (space-ended size field) takes the full parse, and passes."""
    data = b"hello"
    files = {"k/a.bin": data}
    man = manifest.build([FileRecord("k/a.bin", len(data), hashlib.sha256(data).hexdigest())]).encode()
    bundle = raw_bundle(raw_member("MANIFEST.json", man), raw_member("k/a.bin", data, b"%011o " % len(data)))
    archive.unpack(io.BytesIO(bundle), tmp_path, settings=SETTINGS)
    assert (tmp_path / "k/a.bin").read_bytes() == files["k/a.bin"]


def test_chunk_buffers_are_never_reused_while_a_piece_of_them_is_held():
    """Every piece kept until the end still holds its member's bytes: a buffer a view points
    into is never decompressed into again."""
    rnd = random.Random(7)
    files = {f"k/{i:05}.bin": rnd.randbytes(rnd.randrange(1, 9000)) for i in range(3000)}  # ~13 MB
    pieces: dict[str, list[memoryview]] = {}
    current = None
    for kind, value in reader.events(io.BytesIO(packed(files)), SETTINGS):
        if kind == reader.BEGIN:
            current = pieces.setdefault(value.path, [])  # type: ignore[attr-defined]
        elif kind == reader.DATA:
            current.append(value)  # type: ignore[union-attr]
    assert {name: b"".join(held) for name, held in pieces.items()} == files


def test_chunk_buffers_are_reused_once_let_go():
    files = {f"k/{i:05}.bin": os.urandom(4096) for i in range(1000)}  # ~4 MB, does not compress
    source = reader._Source(io.BytesIO(packed(files)), SETTINGS)
    while source._next():
        pass
    assert len(source._pool) <= 2  # each chunk was let go before the next read


def _entry_errors(files: list) -> object:
    try:
        return [manifest._entry(item, index) for index, item in enumerate(files)]
    except BundlerError as exc:
        return type(exc), str(exc)


def _records_errors(files: list) -> object:
    try:
        return manifest._records(files)
    except BundlerError as exc:
        return type(exc), str(exc)


GOOD = {"path": "k/a.bin", "size": 3, "sha256": "a" * 64}


@pytest.mark.parametrize("bad", [
    "not a dict", ["k/a.bin", 3], None, {"path": "k/b.bin", "size": 3},
    {**GOOD, "path": 5}, {**GOOD, "path": "/abs"}, {**GOOD, "path": "k/../x"},
    {**GOOD, "size": -1}, {**GOOD, "size": True}, {**GOOD, "size": 1.5}, {**GOOD, "size": "3"},
    {**GOOD, "sha256": "A" * 64}, {**GOOD, "sha256": "a" * 63}, {**GOOD, "sha256": "g" * 64}, {**GOOD, "sha256": 1},
])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_manifest_entries_checked_together_fail_as_one_by_one(bad, where):
    files = [{**GOOD, "path": f"k/{i}.bin"} for i in range(3)]
    files[where] = bad
    files.append({**GOOD, "path": "../first-bad-path-comes-later"})
    assert _records_errors(files) == _entry_errors(files)


def test_good_manifest_entries_checked_together_give_the_same_records():
    files = [{**GOOD, "path": f"k/{i}.bin", "size": i} for i in range(50)]
    assert _records_errors(files) == _entry_errors(files)
    assert _records_errors([]) == []


def _dumped(man: Manifest) -> bytes:
    """The canonical encoding as ``json.dumps`` of the whole document gives it."""
    doc = {
        "format": man.format,
        "producer": dict(sorted(man.producer.items())),
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in man.files],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("seed", range(5))
def test_manifest_encoding_is_json_dumps_byte_for_byte(seed):
    rnd = random.Random(seed)

    def text(n: int) -> str:
        return "".join(rnd.choice(_ALPHABET) for _ in range(n))

    for _ in range(300):
        files = tuple(
            FileRecord(text(rnd.randrange(1, 40)), rnd.choice([0, 7, 10**15]), text(rnd.choice([3, 64])))
            for _ in range(rnd.randrange(6))
        )
        man = Manifest(files, {text(3): text(5) for _ in range(rnd.randrange(3))}, rnd.choice([1, 2]))
        assert man.encode() == _dumped(man)


def test_manifest_fields_of_other_types_are_encoded_by_json_itself():
    class Name(str):
        pass

    for record in (FileRecord("k/a", True, "x"), FileRecord(Name("k/a"), 1, "x")):
        man = Manifest((record,), {}, 2)
        assert man.encode() == _dumped(man)
