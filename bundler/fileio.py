"""Writing a file so that readers see all of it or none of it.

Cache files are read by other processes at any moment (eight ranks of a node, a compile worker),
so every small file kernel-bundler writes into a cache goes through here: a private temp file in
the same folder (so the rename stays on one filesystem), then ``os.replace``. File permissions
follow the umask, as an ordinary ``open`` would, not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path``, complete, when the block ends without error."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """``data`` at ``path``, all or nothing; creates the parent folder. Raises OSError."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        f.write(data)
