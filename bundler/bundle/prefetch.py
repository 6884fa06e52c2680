"""Running the bundle reader in a worker thread, so two cores share an unpack.

zstd releases the GIL, so the worker decompresses and parses while the caller hashes and writes;
with ``share_hashing`` the worker also hashes members whenever the caller falls behind. Events
cross the thread boundary in batches (a quarter megabyte, or 512 events), so a cache of
thousands of small files does not pay a queue hand-off per file.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator

from bundler.bundle.reader import BEGIN, CHECKED_BEGIN, DATA, END, check_hash

_DONE = object()
_BATCH_BYTES = 256 << 10  # with reader._CHUNK: a few MiB in flight at most (see there)
_BATCH_EVENTS = 512


class Prefetch:
    """Iterates ``source`` in a worker thread; the caller gets the same items, in order.

    An exception in the worker reaches the caller after every item produced before it, so the
    caller's view is exactly that of iterating ``source`` itself. Memory is bounded by the queue
    depth times the batch size. ``close`` stops the worker early (the caller gave up): the worker
    checks the stop flag between any two events, not only when the queue is full, so a closed
    Prefetch stops decompressing within one event, and leaving the iteration early closes it too.

    With ``share_hashing``, the worker balances the load: when the caller falls behind (batches
    pile up in the queue), the worker hashes the next member itself and hands it over as
    CHECKED_BEGIN. Decompressing is cheaper than hashing plus writing, so on two cores a fixed
    split leaves one of them idle; this one adapts to whichever side is slower on the machine.

    ``large_member``: members of at least this many bytes are always hashed by the worker. The
    choice is made once per member, so one large member (a max-autotune cache's 30 MB FX-graph
    entry is 40% of its bytes) that began while the caller happened to keep up would be hashed
    and written by the caller alone while the worker, held back by the queue, waited. A caller
    that writes spends more per byte on the write than the worker spends on the hash, so for
    large members the worker is the right side whatever the backlog says.
    """

    def __init__(
        self,
        source: Iterator[tuple[int, object]],
        depth: int = 8,
        share_hashing: bool = False,
        large_member: int | None = None,
    ) -> None:
        self._source = source
        self._share_hashing = share_hashing
        self._large = large_member if large_member is not None else 1 << 62
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="bundler-read", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        """Batch the source's events; with ``share_hashing``, hash and check the members that start
        while the caller is behind (and every member of at least ``large_member`` bytes).

        One loop for both (not a generator feeding another): it runs once per event, ~4 a file.
        """
        batch: list[tuple[int, object]] = []
        size = 0
        hasher = None
        share, large, stop = self._share_hashing, self._large, self._stop
        try:
            for event in self._source:
                if stop.is_set():
                    return
                kind = event[0]
                if kind == DATA:
                    if hasher is not None:
                        hasher.update(event[1])  # type: ignore[arg-type]
                    size += len(event[1])  # type: ignore[arg-type]
                elif share and kind == BEGIN:
                    if event[1].size >= large or self.backlog() >= _CALLER_BEHIND:  # type: ignore[attr-defined]
                        hasher = hashlib.sha256()
                        event = (CHECKED_BEGIN, event[1])
                elif kind == END and hasher is not None:
                    check_hash(event[1], hasher)  # type: ignore[arg-type]
                    hasher = None
                batch.append(event)
                if size >= _BATCH_BYTES or len(batch) >= _BATCH_EVENTS:
                    if not self._put(batch):
                        return
                    batch, size = [], 0
            self._put(batch) and self._put(_DONE)
        except BaseException as exc:  # handed over, and raised in the caller's thread
            self._put(batch) and self._put(exc)
        finally:
            self._source.close()  # type: ignore[attr-defined]

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, object]]:
        batches = self.batches()
        try:
            for batch in batches:
                yield from batch
        finally:
            batches.close()  # stops the worker now, not when the generator is collected

    def batches(self) -> Iterator[list[tuple[int, object]]]:
        """The items in the batches they crossed over in (a caller's loop a generator level shorter)."""
        try:
            while True:
                item = self._get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            self._stop.set()  # the caller stopped iterating, by choice or by error: so does the worker

    def _get(self) -> object:
        """The next item. A worker that ended without handing over its end (closed meanwhile) is an
        error, never a quiet end: the caller must not take a cut-short bundle for a whole one."""
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return RuntimeError("the bundle reader stopped before the end of the bundle")

    def backlog(self) -> int:
        """Batches produced and not yet taken by the caller."""
        return self._queue.qsize()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


#: Batches waiting in the queue at which the caller counts as behind.
_CALLER_BEHIND = 2
