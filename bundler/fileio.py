"""Writing a file so that readers see all of it or none of it.

Cache files are read by other processes at any moment (eight ranks of a node, a compile worker),
so every small file kernel-bundler writes into a cache goes through here: a private temp file in
the same folder (so the rename stays on one filesystem), then ``os.replace``. File permissions
follow the umask, as an ordinary ``open`` would, not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path``, complete, when the block ends without error.

    The temp file is created with ``O_EXCL`` and mode 0666, so the kernel applies the umask:
    changing the process umask to read it (as a ``mkstemp`` + ``fchmod`` version would) races
    with every other thread creating files and folders at that moment.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
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
