"""Build bundles by hand, hostile ones included, and snapshot directories to prove nothing changed.

Hostile bundles are written with the standard library's ``tarfile`` (which will happily write
links, devices and ``..`` names) behind a manifest we control, then zstd-compressed, so each test
states exactly which rule the bundle breaks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import zstandard

from bundler.bundle.manifest import FORMAT_VERSION, MANIFEST_NAME


def manifest_bytes(files: Mapping[str, bytes], producer: Mapping[str, str] | None = None) -> bytes:
    doc = {
        "format": FORMAT_VERSION,
        "producer": dict(producer or {"bundler": "test"}),
        "files": [
            {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(files.items())
        ],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


def tar_bytes(members: Iterable[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def craft(
    members: Iterable[tuple[tarfile.TarInfo, bytes]],
    manifest_files: Mapping[str, bytes],
    *,
    manifest: bytes | None = None,
) -> tuple[bytes, str]:
    """A zstd tar: our manifest for ``manifest_files`` first, then ``members`` as given.

    Returns the bundle bytes and the manifest's digest (what an honest producer would call it).
    """
    man = manifest if manifest is not None else manifest_bytes(manifest_files)
    body = tar_bytes([regular(MANIFEST_NAME, man), *members])
    return zstd(body), hashlib.sha256(man).hexdigest()


def packed(source: object) -> bytes:
    """A bundle of ``source`` made by our own writer (``archive.pack``), as bytes."""
    from bundler.bundle import archive
    from bundler.config import Settings

    out = io.BytesIO()
    archive.pack(source, out, settings=Settings(zstd_threads=1))  # type: ignore[arg-type]
    return out.getvalue()


def honest(files: Mapping[str, bytes]) -> tuple[bytes, str]:
    return craft([regular(n, d) for n, d in sorted(files.items())], files)


def snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root`` with its type and content (of regular files), links not followed."""
    state: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                state[rel] = ("dir",)
            elif path.is_file():
                state[rel] = ("file", path.read_bytes())
            else:  # a FIFO, socket or device: its kind, never its bytes (a FIFO read would block)
                state[rel] = ("special", stat.S_IFMT(os.lstat(path).st_mode))
    return state


def write_tree(root: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# --- tar headers written byte by byte, for fields no honest writer (tarfile included) produces ----


def raw_header(name: str, size_field: bytes, typeflag: bytes = b"0") -> bytes:
    """One ustar header whose 12-byte size field is exactly ``size_field``, with a valid checksum."""
    block = bytearray(512)
    encoded = name.encode()
    block[0 : len(encoded)] = encoded
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = size_field.ljust(12, b"\0")[:12]
    block[136:148] = b"00000000000\0"
    block[156:157] = typeflag
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def raw_member(name: str, data: bytes, size_field: bytes | None = None) -> bytes:
    """Header and padded data; ``size_field`` overrides what the header claims."""
    return raw_header(name, size_field if size_field is not None else b"%011o\0" % len(data)) + _padded(data)


def raw_pax(records: bytes) -> bytes:
    """A pax ``x`` header carrying ``records`` verbatim (lengths not checked: that is the point)."""
    return raw_header("././@PaxHeader", b"%011o\0" % len(records), b"x") + _padded(records)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return str(length).encode() + body


def raw_bundle(*parts: bytes) -> bytes:
    """A zstd tar of hand-written parts, closed with the end-of-archive blocks."""
    return zstd(b"".join(parts) + bytes(1024))
