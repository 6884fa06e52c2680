"""Streaming S3 downloads: one GET for small objects, parallel ranged GETs for large ones.

Both readers hand bytes to the caller in object order, never hold more than a bounded amount in
memory, and survive a body that breaks off mid-transfer (connection reset, truncation, read
timeout) by asking again for exactly the missing range. Every re-request carries ``If-Match`` with
the ETag of the first response, so if the object is replaced mid-download the read fails cleanly
instead of splicing two objects together. botocore's own retries cover failed *requests*; these
cover failures while *reading a body*, which botocore cannot retry because it has already returned.

Bodies are read with ``read1`` (what has arrived, up to a chunk) rather than ``read(n)``, which
blocks until ``n`` bytes came: a server trickling a byte a second never trips the socket's read
timeout, so only a check of the operation's deadline between reads can stop it. Every ranged answer
must carry the ``Content-Range`` it was asked for: a server that ignores ``Range`` and sends the
whole object is a store problem, and must not surface as a corrupt bundle.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

from bundler import deadline
from bundler.config import Settings
from bundler.errors import StoreError
from bundler.progress import Progress
from bundler.stores.s3_client import S3Object
from bundler.stores.s3_errors import is_transient_stream_error, to_store_error
from bundler.stores.streams import ChunkReader

logger = logging.getLogger(__name__)

#: Bytes taken from the socket per read on the single-stream path.
STREAM_CHUNK = 1 << 20
#: A body that delivers fewer bytes than this over a whole read-timeout window is treated as
#: broken and re-requested (curl's ``--speed-limit``): a store trickling a byte a second never
#: trips the socket's read timeout, since every read gets its byte in time. Any working store
#: sends megabytes in that window; the attempts budget then bounds the whole read.
MIN_BYTES_PER_WINDOW = 1024


class BodyTooSlowError(ConnectionError):
    """A response body arriving slower than :data:`MIN_BYTES_PER_WINDOW` per read-timeout window."""


class _Pace:
    """Watches one body's arrival rate; raises :class:`BodyTooSlowError` on a trickle."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._start = time.monotonic()
        self._bytes = 0

    def feed(self, count: int, key: str) -> None:
        self._bytes += count
        now = time.monotonic()
        if now - self._start < self._window:
            return
        if self._bytes < MIN_BYTES_PER_WINDOW:
            raise BodyTooSlowError(
                f"{key}: {self._bytes} bytes in {now - self._start:.1f} s; the store sends too slowly"
            )
        self._start, self._bytes = now, 0

T = TypeVar("T")


def open_object(obj: S3Object, settings: Settings, progress: Progress) -> BinaryIO:
    """Start a GET and return the stream that fits the object's size.

    The first, unranged GET tells us the size and ETag at no extra round trip (no HEAD). A small
    object is streamed from it directly; a large one uses that open body for its first part and
    ranged GETs for the rest.
    """
    response = obj.call("GetObject")
    size = int(response["ContentLength"])
    source = _RangeSource(obj, response.get("ETag"), settings.max_attempts, settings.read_timeout)
    if size > settings.multipart_threshold and size > settings.multipart_chunksize:
        reader: ChunkReader = _RangedReader(source, response["Body"], size, settings, progress)
    else:
        reader = _StreamReader(source, response["Body"], size, progress)
    return reader.buffered()


class _RangeSource:
    """Re-requests byte ranges of one pinned object version, and retries broken bodies."""

    def __init__(self, obj: S3Object, etag: str | None, attempts: int, window: float) -> None:
        self.obj = obj
        self._etag = etag
        self._attempts = attempts
        self.window = window  # the read timeout: the span over which a body must make progress

    def get(self, start: int, end: int | None = None) -> Any:
        """The body of bytes ``start`` .. ``end`` (exclusive; None = to the end)."""
        params: dict[str, Any] = {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
        if self._etag:
            params["IfMatch"] = self._etag
        response = self.obj.call("GetObject", **params)
        _check_content_range(response, start, end, self.obj)
        return response["Body"]

    def retrying(self, what: str, attempt: Callable[[], T], until: deadline.Deadline) -> T:
        """``attempt()``, repeated after transient body failures, at most ``max_attempts`` times."""
        failures = 0
        while True:
            until.check(f"GetObject {self.obj.key} {what}")
            try:
                return attempt()
            except Exception as exc:
                failures += 1
                self.check_retry(exc, what, failures)

    def check_retry(self, exc: Exception, what: str, failures: int) -> None:
        """Return if ``exc`` broke a body and the budget allows another try; raise it (as ours) if not."""
        if isinstance(exc, StoreError) or not is_transient_stream_error(exc):
            raise exc
        if failures >= self._attempts:
            mapped = to_store_error(exc, "GetObject", self.obj.key, self.obj.ctx)
            raise (mapped or StoreError(f"GetObject {self.obj.key}: {exc}")) from exc
        logger.info("s3://%s/%s: %s broke off (%s); re-requesting", self.obj.bucket, self.obj.key, what, exc)


def _check_content_range(response: dict[str, Any], start: int, end: int | None, obj: S3Object) -> None:
    """A ranged GET must answer with the range asked for (``206`` and ``Content-Range``)."""
    got = str(response.get("ContentRange") or "")
    unit, _, rest = got.partition(" ")
    span = rest.partition("/")[0]
    first, _, last = span.partition("-")
    wanted_last = None if end is None else end - 1
    ok = unit == "bytes" and first.isdigit() and int(first) == start and last.isdigit() and (
        wanted_last is None or int(last) == wanted_last
    )
    if not ok:
        raise StoreError(
            f"s3://{obj.bucket}/{obj.key} at {obj.ctx.endpoint}: asked for bytes {start}-"
            f"{'' if wanted_last is None else wanted_last}, the server answered Content-Range {got or '(none)'}; "
            "it does not support ranged reads properly. Raise BUNDLER_MULTIPART_THRESHOLD above the bundle "
            "size to download in one request, or fix the server"
        )


def read_some(body: Any, n: int) -> bytes:
    """Up to ``n`` bytes of ``body``: what has arrived, without waiting for all ``n``.

    urllib3 2 has ``read1``; with urllib3 1.x this falls back to ``read``, which waits for all
    ``n`` bytes, so readers ask for small pieces (64 KiB) there.
    """
    raw = getattr(body, "_raw_stream", None)
    read1 = getattr(raw, "read1", None)
    if read1 is not None:
        return read1(n)
    return body.read(min(n, 64 << 10))


def _read_exactly(body: Any, n: int, until: deadline.Deadline, key: str, window: float) -> bytes:
    """All ``n`` bytes of a ranged body; a short or trickling body is a transient failure."""
    from botocore.exceptions import IncompleteReadError

    parts = []
    got = 0
    pace = _Pace(window)
    while got < n:
        until.check(f"GetObject {key}")
        chunk = read_some(body, n - got)
        pace.feed(len(chunk), key)
        if not chunk:
            raise IncompleteReadError(actual_bytes=got, expected_bytes=n)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class _StreamReader(ChunkReader):
    """One GET, read as it arrives; on a break, re-opened at the current offset."""

    def __init__(self, source: _RangeSource, body: Any, size: int, progress: Progress) -> None:
        super().__init__(progress, size)
        self._source = source
        self._body: Any = body
        self._size = size
        self._offset = 0
        self._failures = 0
        self._pace = _Pace(source.window)

    def _next_chunk(self) -> bytes:
        """The next piece; a break re-opens at the offset, at most ``max_attempts - 1`` times per stream.

        The budget is per stream, not per break, so a server that cuts every response short
        cannot keep us re-requesting forever, even if each response brings a few bytes.
        """
        while self._offset < self._size:
            try:
                return self._read_some()
            except Exception as exc:
                self._release()
                self._failures += 1
                self._source.check_retry(exc, f"stream at byte {self._offset}", self._failures)
        return b""

    def _read_some(self) -> bytes:
        from botocore.exceptions import IncompleteReadError

        if self._body is None:
            self.deadline.check(f"GetObject {self._source.obj.key}")
            self._body = self._source.get(self._offset)
            self._pace = _Pace(self._source.window)
        chunk = read_some(self._body, min(STREAM_CHUNK, self._size - self._offset))
        self._pace.feed(len(chunk), self._source.obj.key)
        if not chunk:
            raise IncompleteReadError(actual_bytes=self._offset, expected_bytes=self._size)
        self._offset += len(chunk)
        return chunk

    def _release(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None


class _RangedReader(ChunkReader):
    """Parts fetched by a thread pool, handed over strictly in order.

    At most ``max_concurrency`` parts are in flight or waiting, plus the one being consumed, so
    memory stays at about ``(max_concurrency + 1) * multipart_chunksize`` whatever the object size.
    """

    def __init__(self, source: _RangeSource, first_body: Any, size: int, settings: Settings, progress: Progress) -> None:
        super().__init__(progress, size)
        chunk = settings.multipart_chunksize
        self._source = source
        self._ranges = [(start, min(start + chunk, size)) for start in range(0, size, chunk)]
        self._window = max(1, settings.max_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self._window, thread_name_prefix="bundler-s3-get")
        self._queue: collections.deque[Future[bytes]] = collections.deque()
        self._submitted = 0
        self._first_body: Any = first_body
        self._first_lock = threading.Lock()
        self._fill()

    def _fill(self) -> None:
        while self._submitted < len(self._ranges) and len(self._queue) < self._window:
            start, end = self._ranges[self._submitted]
            self._queue.append(self._pool.submit(self._fetch, start, end))
            self._submitted += 1

    def _next_chunk(self) -> bytes:
        if not self._queue:
            return b""
        data = self._queue.popleft().result()
        self._fill()
        return data

    def _fetch(self, start: int, end: int) -> bytes:
        return self._source.retrying(f"range {start}-{end - 1}", lambda: self._fetch_once(start, end), self.deadline)

    def _fetch_once(self, start: int, end: int) -> bytes:
        # Part 0 comes from the already-open first response; a retry re-requests it as a range.
        body = self._take_first_body() if start == 0 else None
        if body is None:
            body = self._source.get(start, end)
        try:
            return _read_exactly(body, end - start, self.deadline, self._source.obj.key, self._source.window)
        finally:
            body.close()

    def _take_first_body(self) -> Any:
        with self._first_lock:
            body, self._first_body = self._first_body, None
            return body

    def _release(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._queue.clear()
        body = self._take_first_body()
        if body is not None:
            body.close()
