"""A loopback HTTP proxy in front of the moto server that injects faults on cue.

Tests add :class:`Fault` rules; each request is matched against them in order, and the first rule
with shots left decides: answer with an S3 error, or forward and then cut the body short (clean
close or TCP reset). Everything else is forwarded untouched, so the S3 semantics under test are
moto's, and every request seen is recorded for assertions.
"""

from __future__ import annotations

import dataclasses
import http.client
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade"}


@dataclasses.dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]

    @property
    def query(self) -> str:
        return urlsplit(self.path).query


@dataclasses.dataclass
class Fault:
    """``when(request)`` selects requests; ``times`` shots (None = forever).

    ``status``/``code``: answer with that S3 error instead of forwarding.
    ``cut_after`` + ``reset``: forward, send the headers and ``cut_after`` body bytes, then close
    the connection (with a TCP RST when ``reset``).
    """

    when: Callable[[Seen], bool]
    times: int | None = 1
    status: int = 0
    code: str = ""
    cut_after: int | None = None
    reset: bool = False


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.seen: list[Seen] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def requests(self, method: str, pred: Callable[[Seen], bool] = lambda seen: True) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.method == method and pred(seen)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record_and_pick(self, seen: Seen) -> Fault | None:
        with self._lock:
            self.seen.append(seen)
            for fault in self._faults:
                if (fault.times is None or fault.times > 0) and fault.when(seen):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

        def _handle(self) -> None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise AssertionError("fault proxy does not handle chunked request bodies")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            fault = proxy._record_and_pick(seen)
            if fault is not None and fault.status:
                self._answer_error(fault)
                return
            status, headers, payload = self._forward(body)
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            if "content-length" not in {name.lower() for name, _ in headers}:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if fault is not None and fault.cut_after is not None:
                self.wfile.write(payload[: fault.cut_after])
                self.wfile.flush()
                self._drop(reset=fault.reset)
                return
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                return response.status, response.getheaders(), response.read()
            finally:
                conn.close()

        def _answer_error(self, fault: Fault) -> None:
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{fault.code}</Code>'
                f"<Message>injected {fault.code}</Message><RequestId>fault-proxy</RequestId></Error>"
            ).encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)

        def _drop(self, *, reset: bool) -> None:
            self.close_connection = True
            if reset:  # SO_LINGER 0: close() sends RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_WR)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


@contextmanager
def silent_server() -> Iterator[str]:
    """An endpoint that completes TCP handshakes (the kernel does, from the backlog) and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def refused_endpoint() -> str:
    """An endpoint nobody listens on: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
