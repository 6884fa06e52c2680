"""The one contract every object store implements: bytes under keys, nothing about bundles.

Backends implement five primitives (``open_read``, ``write``, ``head``, ``list``, ``delete``); the
convenience methods are derived here once, fsspec-style, so a new backend is small and the
conformance suite in ``tests/test_store_contract.py`` runs unchanged against every backend.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import io
from collections.abc import Iterator
from typing import BinaryIO

from bundler.errors import LimitExceededError
from bundler.progress import NULL_PROGRESS, Progress
from bundler.stores.streams import read_up_to


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it."""

    key: str
    size: int
    modified: dt.datetime | None = None


#: The largest ref or record ``read_bytes`` accepts.
SMALL_OBJECT_LIMIT = 1 << 20


class Store(abc.ABC):
    """Bytes under ``/``-separated keys, relative to the store's root (bucket prefix or folder).

    Writes are all-or-nothing: a reader never sees a partial object, whatever happens to the
    writer. ``if_absent=True`` makes a write create-only, which is how immutable, content-addressed
    bundles avoid clobbering each other when many CI jobs push the same one at once.
    """

    #: The URL this store was opened from, for messages.
    url: str

    @abc.abstractmethod
    def open_read(self, key: str, *, progress: Progress = NULL_PROGRESS) -> BinaryIO:
        """A readable, non-seekable stream of the object's bytes; raises NotFoundError on a miss.

        Streaming matters: a multi-GB bundle flows from the socket into ``archive.unpack`` with no
        temp file and no whole-object buffer. The caller closes the stream.
        """

    @abc.abstractmethod
    def write(
        self,
        key: str,
        stream: BinaryIO,
        *,
        size: int | None = None,
        if_absent: bool = False,
        progress: Progress = NULL_PROGRESS,
    ) -> bool:
        """Store everything ``stream`` yields under ``key``.

        Returns True when this call created or replaced the object, False when ``if_absent`` was
        given and the key already existed (the object was left untouched).
        """

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and date of ``key``, or None when it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""

    # --- derived -------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def read_bytes(self, key: str, *, limit: int = SMALL_OBJECT_LIMIT) -> bytes:
        """A whole small object (a ref, an autotune record); bundles stream instead.

        Refuses objects over ``limit`` bytes without reading them whole: whoever can write to the
        bucket must not be able to make a training process allocate gigabytes.
        """
        with self.open_read(key) as stream:
            data = read_up_to(stream, limit + 1)
        if len(data) > limit:
            raise LimitExceededError(
                f"{key!r} in {self.url} is over {limit} bytes, too large for what it should be; "
                "it was not written by kernel-bundler: delete it"
            )
        return data

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        return self.write(key, io.BytesIO(data), size=len(data), if_absent=if_absent)

    def connect(self) -> None:  # noqa: B027 - optional hook, most stores have nothing to prepare
        """Do now what the first request would (S3: import botocore, build the client), so a caller
        can pay for it off its critical path."""

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release pooled connections; the store must not be used afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
