"""Relocating a torch compile cache: the absolute producer paths Inductor's cache entries hold.

What holds absolute paths, and what each costs when the cache moves (docs/torch.md has the
citations and measurements):

* Triton group files (``__grp__*.json``) list absolute child paths; a missing child is a miss.
  Packing reduces them to file names and unpacking places them under this node's directory
  (:mod:`bundler.relocate`, reused as is).
* Inductor's FX graph entries (``fxgraph/**``, pickles) embed the producer's cache directory: in
  ``runnable_graph_str`` (a repro script, harmless), in ``# kernel path:`` comments of the
  generated code (harmless) and, on GPUs, in the pickled ``LocalAutotuneCache`` objects that
  point at each kernel's ``.best_config`` file: a moved max-autotune cache re-tuned those kernels
  and re-created the producer's directory. :func:`relocate_pickle` rewrites those strings.
* The C++ ``.so`` files embed the producer's paths only in their DWARF debug info
  (``DW_AT_comp_dir``), which nothing looks up: left alone.

Rewriting a pickle without running it: :func:`relocate_pickle` walks the opcode stream with
``pickletools.genops`` (a parser: nothing is imported or called), re-encodes the string opcodes
that contain the old directory with correct lengths, drops ``FRAME`` opcodes (framing is an
optional read-ahead hint in protocol 4+, and the frame sizes would no longer be right) and copies
every other opcode byte for byte. Memo indices are unaffected: ``MEMOIZE`` counts objects, not
bytes. A ``bytes`` value that is itself a pickle is relocated the same way, recursively: Inductor
pickles its statically launched Triton kernels (each with the absolute path of its ``.cubin``) and
its autotune caches into bytes inside the FX entry, and on an H200 a moved max-autotune cache whose
nested paths were left alone recompiled 36 Triton kernels and re-tuned 5 (57 s against 20 s
warm-local). Other bytes (binaries) are never edited: a length change would corrupt them.

Inductor's entry file names are content hashes, but lookups iterate a key directory's files and
never check the name, so a rewritten entry keeps its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickletools
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

from bundler.relocate import GroupFileRewriter, is_group_file, to_portable

log = logging.getLogger(__name__)

__all__ = ["UnpackRewriter", "portable_source", "relocate_entries", "relocate_pickle"]

#: Inductor layer folders whose files are pickles that may embed the producer's directories.
PICKLE_FOLDERS = ("inductor/fxgraph/", "inductor/aotautograd/")
#: Larger files are not cache entries we rewrite (max-autotune FX pickles reach ~30 MB).
MAX_PICKLE_BYTES = 512 << 20

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_BYTES_OPS = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
#: Pickles nest pickles a level or two deep; a bound keeps a hostile entry from recursing forever.
_MAX_NESTING = 4


def portable_source(layers: Mapping[str, Path], capture: Mapping[str, str]) -> dict[str, str | bytes]:
    """The pack source for ``transfer.push``: member name -> path, or bytes for group files."""
    out: dict[str, str | bytes] = {}
    for name, path in capture.items():
        if is_group_file(name):
            try:
                with open(path, "rb") as f:
                    out[name] = to_portable(f.read())
            except OSError as exc:
                log.debug("group file %s vanished while packing (%s)", path, exc)
            continue
        out[name] = path
    return out


class UnpackRewriter(GroupFileRewriter):
    """The unpack hook: Triton group files placed in this node's directories.

    The producer and local directories are kept so :func:`relocate_entries` can fix the pickles
    after the unpack (they can be tens of MB, above what an unpack hook may buffer).
    """

    def __init__(self, producer_dirs: Mapping[str, str], local_dirs: Mapping[str, str]) -> None:
        self.moves = {old: local_dirs[layer] for layer, old in producer_dirs.items()
                      if layer in local_dirs and os.path.abspath(old) != os.path.abspath(local_dirs[layer])}


def relocate_pickle(data: bytes, moves: Mapping[str, str], _depth: int = 0) -> bytes | None:
    """``data`` with every pickled string mentioning an old directory pointing at the new one,
    in nested pickles too.

    Returns None when nothing needs to change or the bytes are not a pickle we can parse.
    """
    olds = [old.encode() for old in moves]
    if not any(old in data for old in olds):
        return None
    ordered = sorted(moves.items(), key=lambda item: len(item[0]), reverse=True)
    try:
        ops = list(pickletools.genops(data))
    except Exception as exc:  # noqa: BLE001 - not a pickle (or truncated): leave it to Inductor
        log.debug("not relocating a cache entry that does not parse as a pickle (%s)", exc)
        return None
    out = bytearray()
    changed = False
    for index, (op, arg, pos) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name in _STRING_OPS and isinstance(arg, str) and any(old in arg for old, _ in ordered):
            text = arg
            for old, new in ordered:
                text = text.replace(old, new)
            out += _encode_str(text)
            changed = True
            continue
        if (op.name in _BYTES_OPS and isinstance(arg, bytes) and _depth < _MAX_NESTING
                and arg[:1] == b"\x80" and any(old in arg for old in olds)):
            inner = relocate_pickle(arg, moves, _depth + 1)
            if inner is not None:
                out += _encode_bytes(inner)
                changed = True
                continue
        out += data[pos:end]
    if not changed:
        return None
    return bytes(out)


def _encode_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw
    if len(raw) < 1 << 32:
        return b"X" + struct.pack("<I", len(raw)) + raw
    return b"\x8d" + struct.pack("<Q", len(raw)) + raw


def _encode_bytes(raw: bytes) -> bytes:
    if len(raw) < 256:
        return b"C" + bytes([len(raw)]) + raw
    if len(raw) < 1 << 32:
        return b"B" + struct.pack("<I", len(raw)) + raw
    return b"\x8e" + struct.pack("<Q", len(raw)) + raw


def relocate_entries(root: Path, members: list[str], moves: Mapping[str, str],
                     written: dict[str, str] | None = None) -> int:
    """Rewrite the unpacked pickles among ``members`` (names under the ``inductor/`` layer, which
    lives at ``root``) in place, atomically; returns how many changed. ``written``: filled with
    member name -> sha256 of each rewritten file's new bytes."""
    if not moves:
        return 0
    changed = 0
    for name in members:
        if not name.startswith(PICKLE_FOLDERS):
            continue
        path = root / name[len("inductor/"):]
        try:
            if path.stat().st_size > MAX_PICKLE_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        new = relocate_pickle(data, moves)
        if new is None:
            continue
        if _replace(path, new):
            changed += 1
            if written is not None:
                written[name] = hashlib.sha256(new).hexdigest()
    return changed


def _replace(path: Path, data: bytes) -> bool:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bundler-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError as exc:
        log.debug("could not relocate %s (%s)", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
