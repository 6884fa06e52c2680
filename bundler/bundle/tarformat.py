"""The few tar headers a bundle uses, encoded and decoded by hand.

Why not ``tarfile``: bundles need byte-for-byte determinism and a reader that accepts nothing but
regular files; ``tarfile`` does much more (links, sparse files, global headers, base-256 sizes) and
its per-member overhead dominated unpack time on caches of thousands of small files. We write
POSIX ustar headers, with a pax ``x`` record only for names that do not fit, which GNU tar, bsdtar
and ``tarfile`` all read.
"""

from __future__ import annotations

import zlib

from bundler.errors import NotABundleError, UnsafeMemberError

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_MAX_USTAR_SIZE = 8**11 - 1
_FILE_MODE = 0o644
# typeflag -> what to call it in an error message
_REJECTED_TYPES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"g": "a pax global header",
    b"L": "a GNU long-name record",
    b"K": "a GNU long-link record",
    b"S": "a GNU sparse file",
}
_PAX_KEYS_USED = {"path", "size"}
_PAX_KEYS_IGNORED = {"mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment"}


def padding(size: int) -> int:
    return -size % BLOCK


def checksum(header: bytes | bytearray) -> int:
    """The ustar checksum of a 512-byte header whose checksum field holds spaces: its byte sum.

    Computed from two residues taken at C speed rather than by ``sum(header)``, whose byte-by-byte
    iteration cost ~5 µs a header, 8 ms of CPU per 1,600-file unpack (and again per pack):

    * zlib's Adler-32 keeps ``(1 + sum) mod 65521`` in its low 16 bits;
    * the header read as one base-256 number is congruent to its byte sum modulo 255 (256 = 1).

    The sum of 512 bytes is at most 130,560, under 2 * 65521, so it is the first residue or that
    plus 65521; the two differ by 241 modulo 255, so the second residue tells which.
    """
    if len(header) != BLOCK:
        raise ValueError(f"a tar header is {BLOCK} bytes, not {len(header)}")
    low = ((zlib.adler32(header) & 0xFFFF) - 1) % _ADLER_MOD
    if low % 255 == int.from_bytes(header, "little") % 255:
        return low
    return low + _ADLER_MOD


_ADLER_MOD = 65521


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


# The fields every header shares (mode 0644, owner 0, mtime 0: output depends on content only),
# computed once: a cache has thousands of headers to write.
_MODE_UID_GID = _octal(_FILE_MODE, 8) + _octal(0, 8) + _octal(0, 8)
_MTIME = _octal(0, 12)
#: After the typeflag (offset 156): linkname, then the ustar magic and version at 257, then zeros.
_AFTER_TYPEFLAG = (bytes(100) + b"ustar\x0000").ljust(BLOCK - 157, b"\0")


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _header(name: bytes, size: int, typeflag: bytes) -> bytes:
    """name (100 bytes at most), mode, uid, gid, size, mtime, checksum, typeflag, then the fixed rest."""
    front = name.ljust(100, b"\0") + _MODE_UID_GID + _octal(size, 12) + _MTIME
    back = typeflag + _AFTER_TYPEFLAG
    return front + b"%06o\0 " % checksum(front + b"        " + back) + back


#: The byte sum of a plain file header less its name and size fields (the checksum field counted
#: as spaces, as the checksum rule says): the part of the checksum that never changes.
_PLAIN_SUM = sum(_MODE_UID_GID + _MTIME + b"        " + b"0" + _AFTER_TYPEFLAG)
_PLAIN_BACK = b"0" + _AFTER_TYPEFLAG


def file_header(path: str, size: int) -> bytes:
    """Header block(s) for a regular file: fixed mode, owner and mtime, so output is deterministic.

    Once per member when packing, and again when unpacking (the reader compares the header it
    reads against this one), so the common header, an ASCII name of at most 100 bytes and a size
    the ustar field holds, is built from the two fields that vary: ~2 us instead of ~5 (checksum of the whole block).
    Its checksum is the fixed part's byte sum plus the two fields': Adler-32's low half is one
    plus the byte sum while that stays under 65521, which 112 bytes always do.
    """
    name = path.encode("utf-8", "surrogateescape")
    if len(name) <= 100 and 0 <= size <= _MAX_USTAR_SIZE and name.isascii():
        size_field = b"%011o\0" % size
        total = _PLAIN_SUM + (zlib.adler32(name + size_field) & 0xFFFF) - 1
        return b"".join(
            (name.ljust(100, b"\0"), _MODE_UID_GID, size_field, _MTIME, b"%06o\0 " % total, _PLAIN_BACK)
        )
    records = b""
    if len(name) > 100 or not name.isascii():
        records += _pax_record("path", path)
    if size > _MAX_USTAR_SIZE:
        records += _pax_record("size", str(size))
    if not records:
        return _header(name, size, b"0")
    pax = _header(b"././@PaxHeader", len(records), b"x") + records + b"\0" * padding(len(records))
    return pax + _header(_ascii_stub(name), min(size, _MAX_USTAR_SIZE), b"0")


def _ascii_stub(name: bytes) -> bytes:
    """The ustar name field under a pax path record: readers use the pax path; keep this ASCII."""
    return name.decode("ascii", "replace").encode("ascii", "replace")[:100]


class Header:
    """One parsed header: ``typeflag`` (``b"0"`` a file, ``b"x"`` pax records), name and size.

    A plain class: a dataclass would make ``bundler unpack`` import dataclasses (see bundler.frozen).
    """

    __slots__ = ("typeflag", "name", "size")

    def __init__(self, typeflag: bytes, name: str, size: int) -> None:
        self.typeflag = typeflag
        self.name = name
        self.size = size


def _field_str(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


_DECIMAL_DIGITS = frozenset(b"0123456789")
#: A pax ``size`` longer than this many digits is beyond any limit a reader accepts.
_MAX_PAX_SIZE_DIGITS = 20


def _parse_octal(raw: bytes, what: str) -> int:
    """A numeric header field: octal digits, optionally space-padded in front, ended by NUL or space.

    Strict on purpose: ``int(text, 8)`` alone accepts a sign (``-0000000001`` is -1, which made
    every reader loop forever), underscores and inner spaces. Only what tar writers emit passes.
    """
    if raw[:1] and raw[0] & 0x80:
        raise NotABundleError(f"tar header uses a base-256 {what}, which bundles never do")
    text, _, rest = raw.partition(b"\0")
    text = text.lstrip(b" ").rstrip(b" ")
    if rest.strip(b"\0 ") or text.translate(None, b"01234567"):  # any byte but an octal digit
        raise NotABundleError(f"tar header has a malformed {what} field {raw!r}")
    return int(text, 8) if text else 0


def parse_decimal(raw: str, what: str) -> int:
    """A pax number: decimal digits only (no sign, spaces or underscores), of a plausible length."""
    data = raw.encode("utf-8", "surrogateescape")
    if not data or len(data) > _MAX_PAX_SIZE_DIGITS or not _DECIMAL_DIGITS.issuperset(data):
        raise NotABundleError(f"{what} is {raw[:40]!r}, not a plain decimal number")
    return int(data)


def parse_header(block: bytes) -> Header:
    """Decode one 512-byte header, rejecting every member type except regular files and pax records."""
    stored = _parse_octal(block[148:156], "checksum")
    if len(block) != BLOCK or stored != checksum(block[:148] + b"        " + block[156:]):
        raise NotABundleError(
            "tar header checksum does not match: the stream is not a tar archive or is corrupt"
        )
    if block[257:262] != b"ustar":
        raise NotABundleError("tar header is not in ustar/pax format")
    typeflag = block[156:157]
    name = _field_str(block[0:100])
    if block[345]:  # a ustar prefix (ours never have one; other writers' may)
        name = _field_str(block[345:500]) + b"/" + name
    decoded = name.decode("utf-8", "surrogateescape")
    if typeflag in (b"0", b"\0", b"x"):
        return Header(b"x" if typeflag == b"x" else b"0", decoded, _parse_octal(block[124:136], "size"))
    kind = _REJECTED_TYPES.get(typeflag, f"an unknown member type {typeflag!r}")
    raise UnsafeMemberError(f"member {decoded!r} is {kind}; bundles hold regular files only")


def parse_pax(data: bytes, member_hint: str) -> dict[str, str]:
    """Parse pax ``x`` records; only ``path`` and ``size`` matter, harmless timestamps are ignored.

    Every record must fit inside ``data`` and have a length of decimal digits only, so each step
    of the loop moves forward and a record can never point outside the header it came in.
    """
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + _MAX_PAX_SIZE_DIGITS + 1)
        digits = data[pos:space]
        if space < 0 or not digits or not _DECIMAL_DIGITS.issuperset(digits):
            raise NotABundleError(f"malformed pax header before member {member_hint!r}")
        length = int(digits)
        end = pos + length
        if end <= space + 1 or end > len(data):
            raise NotABundleError(f"malformed pax header before member {member_hint!r}")
        record = data[space + 1 : end]
        if not record.endswith(b"\n") or b"=" not in record:
            raise NotABundleError(f"malformed pax header before member {member_hint!r}")
        key, value = record[:-1].split(b"=", 1)
        text_key = key.decode("utf-8", "replace")
        if text_key in _PAX_KEYS_USED:
            if text_key in records:
                raise NotABundleError(f"pax header before member {member_hint!r} sets {text_key!r} twice")
            records[text_key] = value.decode("utf-8", "surrogateescape")
        elif text_key not in _PAX_KEYS_IGNORED:
            raise UnsafeMemberError(
                f"member {member_hint!r} carries pax attribute {text_key[:64]!r}; bundles only use path and size"
            )
        pos = end
    if "size" in records:
        parse_decimal(records["size"], f"the pax size of member {member_hint!r}")
    return records
