"""The sandbox's HTTP plumbing: the listening server, its connections, the bytes on the wire.

Everything here is about HTTP/1.1 on a socket, not about what the API answers: binding
without a DNS lookup, tracking open connections so ``stop()`` can cut them, reading a body
(Content-Length or chunked), writing a status line and headers, and aborting a connection
with a TCP RST. :mod:`cometkit.sandbox._handler` decides what each request is answered.
"""

from __future__ import annotations

import email.utils
import http
import logging
import socket
import socketserver
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

__all__ = ["Server", "ConnectionHandler", "OpenConnections", "MAX_BODY_BYTES", "origin",
           "read_body", "head", "reset_connection"]

log = logging.getLogger("cometkit.sandbox")

#: Request bodies above this are refused (the sandbox is not a storage service).
MAX_BODY_BYTES = 64 * 1024 * 1024

_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\nServer: cometkit-sandbox\r\n"
    for status in http.HTTPStatus
}
_LINGER_RESET = struct.pack("ii", 1, 0)

_date_cache = (0, "")


def origin(address: tuple) -> str:
    """``http://host:port`` of a listening ``(host, port)`` (an IPv6 host in brackets)."""
    host, port = address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _date_header() -> str:
    """``Date: ...\\r\\n``, formatted at most once a second."""
    global _date_cache
    now = int(time.time())
    stamp, text = _date_cache
    if stamp != now:
        text = f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n"
        _date_cache = (now, text)
    return text


def head(status: int, request_id: str, headers: tuple, content_type: str,
         length: Optional[int], close: bool) -> str:
    """The status line and headers of an answer; ``length`` ``None``: chunked encoding."""
    framing = ("Transfer-Encoding: chunked\r\n" if length is None
               else f"Content-Length: {length}\r\n")
    parts = [_STATUS_LINES[status], _date_header(), "Content-Type: ", content_type, "\r\n",
             framing, "x-request-id: ", request_id, "\r\n"]
    for name, value in headers:
        parts += (name, ": ", value, "\r\n")
    if close:
        parts.append("Connection: close\r\n")
    parts.append("\r\n")
    return "".join(parts)


def reset_connection(handler: ConnectionHandler) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing proxy would."""
    handler.close_connection = True
    try:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    handler.connection.close()


def read_body(handler: ConnectionHandler) -> Optional[bytes]:
    """The request body (Content-Length or chunked), or ``None`` when it cannot be read."""
    headers = handler.headers
    encoding = headers.get("Transfer-Encoding")
    try:
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                return None
            return _read_chunked(handler.rfile)
        length = headers.get("Content-Length")
        if length is None:
            return b""
        size = int(length)
        if not 0 <= size <= MAX_BODY_BYTES:
            return None
        body = handler.rfile.read(size)
        return body if len(body) == size else None
    except (ValueError, OSError):
        return None


def _read_chunked(rfile: Any) -> Optional[bytes]:
    parts = []
    total = 0
    while True:
        size = int(rfile.readline(1024).split(b";")[0].strip(), 16)
        if size == 0:
            break
        total += size
        if total > MAX_BODY_BYTES:
            return None
        parts.append(rfile.read(size))
        rfile.readline(16)
    while rfile.readline(1024).strip():  # trailers
        pass
    return b"".join(parts)


class OpenConnections:
    """The sockets of the connections being served, so that ``stop()`` can cut them all."""

    def __init__(self, on_open: Callable[[], None]) -> None:
        self._on_open = on_open
        self._sockets: set = set()
        self._lock = threading.Lock()

    def opened(self, connection: socket.socket) -> None:
        self._on_open()
        with self._lock:
            self._sockets.add(connection)

    def closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(connection)

    def cut_all(self) -> None:
        """Shut every open connection down (a handler blocked reading it wakes up)."""
        with self._lock:
            connections = list(self._sockets)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ConnectionHandler(BaseHTTPRequestHandler):
    """One client connection (keep-alive: many requests); each is passed to ``server.serve``."""

    protocol_version = "HTTP/1.1"
    server_version = "cometkit-sandbox"
    sys_version = ""
    disable_nagle_algorithm = True
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.connections.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.connections.closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _dispatch(self) -> None:
        self.server.serve(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class Server(ThreadingHTTPServer):
    """A threading HTTP server that hands each request to ``serve`` and tracks connections."""

    daemon_threads = True
    #: Benchmarks open many connections at once; the default backlog of 5 drops SYNs.
    request_queue_size = 1024

    def __init__(self, address: tuple, serve: Callable[[ConnectionHandler], None],
                 connections: OpenConnections) -> None:
        self.serve = serve
        self.connections = connections
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ConnectionHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients vanish mid-answer and stop() cuts connections: not worth a traceback.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)
