"""Reads from an S3 store through a helper process, so botocore never loads in the job's process.

A torch job's first compile waits for its session's fetch, and on a 2-core machine half of that
wait was botocore: importing it (0.25 s) and building an S3 client (0.20 s) are Python that holds
the GIL, so neither overlaps the job's own start-up, however the threads are arranged (measured:
``benchmarks/README.md``, session 6). A child process has its own GIL. It is started when the
session begins, imports botocore and builds the client while the job imports Inductor and
computes the facts, and then serves the session's reads: the ref, the bundles, the listing that
explains a miss.

Only reads go through the child, and only bytes cross: whatever comes back is parsed, verified
and unpacked in the job's process exactly as from the store itself, so the child holds no trust
the store does not. Writes stay in the job's process (a push comes at the end, or in the
background). If the child cannot start or dies, reads fall back to the store in this process; a
child stops when its parent closes the proxy or exits (its stdin ends).

The wire: one JSON line per request on the child's stdin; answers as frames on a pipe of their
own (not stdout, where a ``sitecustomize`` or ``.pth`` banner could print first), one type byte and
a 4-byte length, then the payload: ``J`` a JSON document, ``D`` object bytes, ``E`` the end of an
object. A read's first frame says whether the object is there; a frame of another type or an
implausible length means the child is not speaking the protocol, and counts as a child gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import IO, Any, BinaryIO

from bundler import errors
from bundler.config import Settings
from bundler.errors import StoreError, StoreUnreachableError
from bundler.progress import NULL_PROGRESS, Progress
from bundler.stores.base import ObjectInfo, Store

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">cI")
#: Object bytes per data frame: big enough that framing costs nothing, small enough to stream.
_FRAME = 1 << 20
#: The largest JSON frame believed (a listing of many refs); anything above is not our child talking.
_MAX_JSON_FRAME = 256 << 20
_KINDS = frozenset((b"J", b"D", b"E"))
#: The child's first statement: drop the working directory from the path before importing anything,
#: so a ``json.py`` or ``bundler/`` where the job runs cannot stand in for the real modules.
_CHILD = "import sys; sys.path[:] = [p for p in sys.path if p]; from bundler.stores.proxy import serve; serve()"
#: The settings the child's store needs (all plain values; signing stays with the parent, which
#: verifies what it reads).
_STORE_FIELDS = ("remote", "connect_timeout", "read_timeout", "max_attempts", "retry_mode",
                 "multipart_threshold", "multipart_chunksize", "max_concurrency")


def wanted(settings: Settings) -> bool:
    """Whether reads of ``settings.remote`` should go through a child: S3 only (a folder store costs
    nothing to open), and not while moto's in-process mock is loaded, which a child cannot see."""
    return bool(settings.remote) and settings.remote.startswith("s3://") and "moto" not in sys.modules


class ProxyStore(Store):
    """The read half of the store at ``settings.remote``, served by a child process."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.remote or ""
        self._settings = settings
        self._lock = threading.Lock()  # one request at a time on the pipe
        self._child: subprocess.Popen | None = None
        self._ready: bool | None = None  # None until the child's first frame
        self._local: Store | None = None
        self._frames: IO[bytes] | None = None
        self._fds: list[int] = []  # [requests (write end), frames (read end)] while the child is up
        try:
            self._start()
            self._send({name: getattr(settings, name) for name in _STORE_FIELDS})
        except Exception as exc:  # noqa: BLE001 - whatever stops the child, this process reads instead
            log.debug("no store helper process (%s); reading in this process", exc)
            self._stop()
        _LIVE.add(self)

    def _start(self) -> None:
        """Spawn the child with two pipes of our own: requests on its stdin, frames on another fd.

        This side keeps plain descriptors (file objects only as non-owning views), so a process
        forked from the job can drop them with ``os.close`` and nothing closes them twice.
        """
        frames_read, frames_write = os.pipe()
        requests_read, requests_write = os.pipe()
        try:
            # bundler's own folder first: the job may have imported it from its working directory,
            # which the child leaves off its path.
            here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            self._child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(frames_write)],
                stdin=requests_read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": os.pathsep.join([here, *(p for p in sys.path if p)])},
                close_fds=True, pass_fds=(frames_write,),
            )
        except BaseException:
            os.close(frames_read)
            os.close(requests_write)
            raise
        finally:
            os.close(frames_write)  # the child holds them now: its exit is our EOF, ours its EOF
            os.close(requests_read)
        self._fds = [requests_write, frames_read]
        self._frames = os.fdopen(frames_read, "rb", closefd=False)

    # --- the read primitives -------------------------------------------------------------------

    def open_read(self, key: str, *, progress: Progress = NULL_PROGRESS) -> BinaryIO:
        if self._usable():
            self._lock.acquire()
            try:
                self._send({"op": "open_read", "key": key})
                self._answer()
                return _ChildStream(self, progress)  # type: ignore[return-value]  # releases the lock
            except _HelperGone:
                self._lock.release()  # nothing read yet: the store here answers instead
            except BaseException:
                self._lock.release()
                raise
        return self._fallback().open_read(key, progress=progress)

    def head(self, key: str) -> ObjectInfo | None:
        if self._usable():
            try:
                found = self._ask({"op": "head", "key": key})
                return None if found is None else _info(found)
            except _HelperGone:
                pass
        return self._fallback().head(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if self._usable():
            try:
                return iter([_info(item) for item in self._ask({"op": "list", "prefix": prefix})])
            except _HelperGone:
                pass
        return self._fallback().list(prefix)

    def write(self, key: str, stream: BinaryIO, *, size: int | None = None, if_absent: bool = False,
              progress: Progress = NULL_PROGRESS) -> bool:
        raise StoreError(f"the store helper process only reads; write {key!r} to {self.url} in this process")

    def delete(self, key: str) -> None:
        raise StoreError(f"the store helper process only reads; delete {key!r} from {self.url} in this process")

    def close(self) -> None:
        self._stop()
        if self._local is not None:
            self._local.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _usable(self) -> bool:
        """Whether the child is up (waiting for its first frame the first time): else fall back."""
        if self._child is None:
            return False
        if self._ready is None:
            with self._lock:
                if self._ready is None:
                    try:
                        self._answer()
                        self._ready = True
                    except (StoreError, errors.ConfigError) as exc:
                        log.debug("store helper process unusable (%s); reading in this process", exc)
                        self._ready = False
                        self._stop()
        return bool(self._ready)

    def _fallback(self) -> Store:
        if self._local is None:
            from bundler.stores import open_store

            self._local = open_store(self.url, self._settings)
        return self._local

    def _ask(self, request: dict[str, Any]) -> Any:
        with self._lock:
            self._send(request)
            return self._answer()

    def _send(self, message: dict[str, Any]) -> None:
        line = memoryview(json.dumps(message).encode() + b"\n")
        try:
            if not self._fds:
                raise OSError("stopped")
            while line:
                line = line[os.write(self._fds[0], line):]
        except OSError as exc:
            self._stop()
            raise _gone(self.url, exc) from None

    def _answer(self) -> Any:
        """The next JSON frame's value; a frame naming an error raises that error here."""
        kind, payload = self._frame()
        if kind != b"J":
            self._stop()
            raise _gone(self.url, f"unexpected frame {kind!r}")
        message = json.loads(payload)
        if "error" in message:
            raise _error(message["error"], message.get("message", ""))
        return message.get("value")

    def _frame(self) -> tuple[bytes, bytes]:
        frames = self._frames
        if self._child is None or frames is None:
            raise _gone(self.url, "stopped")
        head = _read_exact(frames, _HEADER.size)
        if head is None:
            self._stop()
            raise _gone(self.url, "it exited")
        kind, size = _HEADER.unpack(head)
        if kind not in _KINDS or size > (_MAX_JSON_FRAME if kind == b"J" else _FRAME):
            self._stop()
            raise _gone(self.url, f"it sent {head!r}, not a frame")
        payload = _read_exact(frames, size) if size else b""
        if payload is None:
            self._stop()
            raise _gone(self.url, "it exited mid-frame")
        return kind, payload

    def _stop(self) -> None:
        child, self._child = self._child, None
        self._ready = False
        if child is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                child.kill()
                child.wait(timeout=5)
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds, self._frames = self._fds, [], None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _forget_in_forked_child(self) -> None:
        """In a process forked from the job (a DataLoader worker): drop the pipes without killing
        the job's helper, so the helper sees its stdin end when the job exits, not when the last
        worker does."""
        child, self._child = self._child, None
        self._ready = False
        self._close_fds()
        if child is not None:
            child.returncode = 0  # not this process's child: nothing here may wait for it


#: Open proxies, so a forked child can let go of their pipes (see _forget_in_forked_child).
_LIVE: weakref.WeakSet[ProxyStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for proxy in list(_LIVE):
        proxy._forget_in_forked_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _ChildStream:
    """An object's bytes as the child sends them; holds the proxy's pipe until closed. Closing
    before the end stops the child (the rest is not worth draining); later reads fall back."""

    def __init__(self, proxy: ProxyStore, progress: Progress) -> None:
        self._proxy = proxy
        self._progress = progress
        progress.start()
        self._buffer = memoryview(b"")
        self._ended = False
        self._closed = False

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if not self._buffer and (self._ended or not self._more()):
                break
            take = len(self._buffer) if size < 0 else min(len(self._buffer), size - len(out))
            out += self._buffer[:take]
            self._buffer = self._buffer[take:]
        return bytes(out)

    def _more(self) -> bool:
        kind, payload = self._proxy._frame()
        if kind == b"D":
            self._buffer = memoryview(payload)
            self._progress.update(len(payload))
            return True
        if kind == b"E":
            self._ended = True
            return False
        if kind == b"J":  # an error after the first bytes: the store's own, raised as such
            message = json.loads(payload)
            self._ended = True
            raise _error(message.get("error", "StoreError"), message.get("message", ""))
        raise _gone(self._proxy.url, f"unexpected frame {kind!r}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._progress.close()
        if not self._ended:
            self._proxy._stop()
        self._proxy._lock.release()

    def __enter__(self) -> _ChildStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exact(pipe: IO[bytes], size: int) -> bytes | None:
    data = pipe.read(size)
    return data if len(data) == size else None


class _HelperGone(StoreUnreachableError):
    """The helper process stopped; before an object's first byte the store here takes over."""


def _gone(url: str, why: object) -> _HelperGone:
    return _HelperGone(f"the helper process reading {url} stopped ({why}); the session goes on without it")


def _error(name: str, message: str) -> Exception:
    """The child's error as the same class here (a store error by default)."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.BundlerError)):
        cls = StoreError
    return cls(message)


def _info(item: dict[str, Any]) -> ObjectInfo:
    modified = item.get("modified")
    return ObjectInfo(key=item["key"], size=item["size"],
                      modified=dt.datetime.fromisoformat(modified) if modified else None)


# --- the child ------------------------------------------------------------------------------------


def serve() -> None:
    """The child's loop: open the store, build its client, then answer requests until stdin ends.

    Frames go to the descriptor named on the command line, never to stdout (see the module doc).
    """
    out = os.fdopen(int(sys.argv[1]), "wb")
    requests = sys.stdin.buffer
    try:
        fields = json.loads(requests.readline())
        from bundler.stores import open_store

        store = open_store(fields["remote"], Settings(**fields))
        store.connect()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which reads in-process then
        _send_json(out, {"error": type(exc).__name__, "message": str(exc)})
        return
    _send_json(out, {"value": True})
    for line in requests:
        request = json.loads(line)
        try:
            _serve_one(store, request, out)
        except BrokenPipeError:
            return
        except Exception as exc:  # noqa: BLE001 - every failure goes back as an error frame
            _send_json(out, {"error": type(exc).__name__, "message": str(exc)})


def _serve_one(store: Store, request: dict[str, Any], out: IO[bytes]) -> None:
    op = request["op"]
    if op == "head":
        found = store.head(request["key"])
        _send_json(out, {"value": None if found is None else _plain(found)})
    elif op == "list":
        _send_json(out, {"value": [_plain(item) for item in store.list(request["prefix"])]})
    elif op == "open_read":
        stream = store.open_read(request["key"])  # raises NotFoundError before any byte
        _send_json(out, {"value": True})
        try:
            with stream:
                while chunk := stream.read(_FRAME):
                    _send(out, b"D", chunk)
        except Exception as exc:  # noqa: BLE001 - mid-object: the error frame ends the object
            _send_json(out, {"error": type(exc).__name__, "message": str(exc)})
            return
        _send(out, b"E", b"")
    else:
        raise StoreError(f"unknown request {op!r}")


def _plain(info: ObjectInfo) -> dict[str, Any]:
    return {"key": info.key, "size": info.size, "modified": info.modified.isoformat() if info.modified else None}


def _send_json(out: IO[bytes], message: dict[str, Any]) -> None:
    _send(out, b"J", json.dumps(message).encode())


def _send(out: IO[bytes], kind: bytes, payload: bytes) -> None:
    out.write(_HEADER.pack(kind, len(payload)))
    if payload:
        out.write(payload)
    out.flush()
