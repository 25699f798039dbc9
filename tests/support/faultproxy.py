"""A programmable HTTP proxy on 127.0.0.1 that injects S3 faults between a client and a store.

Why HTTP-aware rather than a byte pipe: faults must hit a chosen *request* (the next GET,
the next two PUTs) on keep-alive connections, and "drop after N body bytes" must count
body bytes, not header bytes. The client's headers, Host included, are forwarded
unchanged, otherwise SigV4 signatures would not match.

Faults (each applies to the next `count` requests whose method is in `methods` and whose
path contains `path_contains`):
- `status(code)`: answer with an S3 XML error (500 InternalError / 503 SlowDown) without
  forwarding;
- `drop_after(nbytes)`: forward, send the headers and `nbytes` of the body, then close the
  connection (the client sees an IncompleteRead mid-body);
- `drop_request()`: read the request, then close without answering (upload fault);
- `slow(bytes_per_s)`: forward the body at a throttled rate;
- `stall_after(nbytes)`: forward, send the headers and `nbytes` of the body, then send nothing
  more while keeping the connection open (a hung store; ends when the proxy stops).

Threads are daemons, the server stops on `stop()`, on context exit, or by itself after
`max_lifetime` seconds, so a forgotten proxy never outlives its test session for long.
The trainer can use it from a subprocess: point `AWS_ENDPOINT_URL` at `proxy.endpoint`.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_CODES = {500: "InternalError", 503: "SlowDown", 502: "BadGateway", 504: "GatewayTimeout"}
CHUNK = 64 * 1024


@dataclass
class Fault:
    kind: str  # status | drop_after | drop_request | slow | stall_after
    count: int
    methods: tuple[str, ...]
    path_contains: str = ""
    value: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.count > 0 and method in self.methods and self.path_contains in path


class FaultProxy:
    """Forward HTTP to `upstream`, injecting the faults programmed with the methods below."""

    def __init__(self, upstream: str, max_lifetime: float = 900.0) -> None:
        u = urlparse(upstream)
        self.upstream_host, self.upstream_port = u.hostname or "127.0.0.1", u.port or 80
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # releases stalled bodies
        self.requests: Counter[str] = Counter()  # method -> requests seen
        self.injected: Counter[str] = Counter()  # fault kind -> times injected
        self.seen: Counter[tuple[str, str]] = Counter()  # (method, path without query) -> requests
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(max_lifetime, self.stop)
        self._timer.daemon = True

    # --- programming ---------------------------------------------------------------------

    def _add(self, kind: str, count: int, methods: tuple[str, ...], path_contains: str, value: int) -> None:
        with self._lock:
            self._faults.append(Fault(kind, count, tuple(m.upper() for m in methods), path_contains, value))

    def status(self, code: int = 503, count: int = 1, methods: tuple[str, ...] = ("GET",),
               path_contains: str = "") -> None:
        self._add("status", count, methods, path_contains, code)

    def drop_after(self, nbytes: int, count: int = 1, methods: tuple[str, ...] = ("GET",),
                   path_contains: str = "") -> None:
        self._add("drop_after", count, methods, path_contains, nbytes)

    def drop_request(self, count: int = 1, methods: tuple[str, ...] = ("PUT",), path_contains: str = "") -> None:
        self._add("drop_request", count, methods, path_contains, 0)

    def slow(self, bytes_per_s: int, count: int = 1, methods: tuple[str, ...] = ("GET",),
             path_contains: str = "") -> None:
        self._add("slow", count, methods, path_contains, bytes_per_s)

    def stall_after(self, nbytes: int, count: int = 1, methods: tuple[str, ...] = ("GET",),
                    path_contains: str = "") -> None:
        self._add("stall_after", count, methods, path_contains, nbytes)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> int:
        """Faults programmed but not yet injected."""
        with self._lock:
            return sum(f.count for f in self._faults)

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests[method] += 1
            self.seen[(method, path.split("?")[0])] += 1
            for f in self._faults:
                if f.matches(method, path):
                    f.count -= 1
                    self.injected[f.kind] += 1
                    return Fault(f.kind, 1, f.methods, f.path_contains, f.value)
        return None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- the handler ---------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream: http.client.HTTPConnection | None = None

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _any(self) -> None:
                body = self._read_body()
                fault = proxy._take(self.command, self.path)
                if fault and fault.kind == "status":
                    return self._error(fault.value)
                if fault and fault.kind == "drop_request":
                    return self._abort()
                try:
                    resp = self._forward(body)
                except OSError:
                    return self._abort()
                self._relay(resp, fault)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            return bytes(out)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> http.client.HTTPResponse:
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                               timeout=120)
                conn = self.upstream
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                return conn.getresponse()

            def _relay(self, resp: http.client.HTTPResponse, fault: Fault | None) -> None:
                length = resp.getheader("Content-Length")
                body = None if length is not None else resp.read()  # chunked upstream: small XML
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", length if body is None else str(len(body)))
                self.end_headers()
                if self.command == "HEAD":
                    resp.read()
                    return
                if body is not None:
                    self.wfile.write(body)
                    return
                sent, limit = 0, fault.value if fault and fault.kind in ("drop_after", "stall_after") else None
                while chunk := resp.read(CHUNK):
                    if limit is not None and sent + len(chunk) >= limit:
                        self.wfile.write(chunk[: limit - sent])
                        self.wfile.flush()
                        if fault is not None and fault.kind == "stall_after":
                            proxy._stopped.wait()
                        self._close_upstream()
                        return self._abort()
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if fault and fault.kind == "slow":
                        self.wfile.flush()
                        time.sleep(len(chunk) / max(1, fault.value))

            def _error(self, code: int) -> None:
                name = _CODES.get(code, "InternalError")
                xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code>'
                       f"<Message>injected by FaultProxy</Message></Error>").encode()
                self.send_response_only(code)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                self.wfile.write(xml)

            def _close_upstream(self) -> None:
                if self.upstream is not None:
                    self.upstream.close()
                    self.upstream = None

            def _abort(self) -> None:
                self.close_connection = True
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def finish(self) -> None:
                self._close_upstream()
                super().finish()

        return Handler
