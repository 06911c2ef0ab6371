"""A loopback HTTP server whose answers each test scripts.

The sandbox plays a well-behaved provider; this one plays whatever a test needs at the byte
level (a given status and body, an HTML page, a redirect, a reset, a stall), and remembers
every request it saw so tests can count attempts.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional


@dataclass
class Seen:
    method: str
    path: str
    headers: dict
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Reply:
    status: int = 200
    body: Any = b""
    headers: dict = field(default_factory=dict)
    #: "reset": abort the connection without answering; "stall": sleep ``delay_s`` first;
    #: "cut": send the headers and ``events``, then abort the connection.
    action: Optional[str] = None
    delay_s: float = 0.0
    #: SSE events (strings, sent as ``data: ...``), chunked.
    events: Optional[list] = None


def json_reply(status: int, obj: Any, **headers: str) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **headers})


def chat_body(content: str = "hi", model: str = "m1") -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


class ScriptedServer:
    """``with ScriptedServer(handler) as srv``: ``handler(seen) -> Reply`` per request."""

    def __init__(self, handler: Optional[Callable[[Seen], Reply]] = None) -> None:
        self.handler = handler or (lambda seen: json_reply(200, chat_body()))
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.stop_event = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, dict(self.headers.items()), body)
                with server.lock:
                    server.seen.append(seen)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = server.handler(seen)
                    if reply.delay_s:
                        server.stop_event.wait(reply.delay_s)
                    if reply.action == "reset":
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
                        self.close_connection = True
                        self.connection.close()
                        return
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    if reply.events is not None:
                        self.send_header("Content-Type", "text/event-stream")
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for event in reply.events:
                            data = f"data: {event}\n\n".encode()
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                            self.wfile.flush()
                        if reply.action == "cut":  # reset mid-stream, after these events
                            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                       struct.pack("ii", 1, 0))
                            self.close_connection = True
                            self.connection.close()
                            return
                        self.wfile.write(b"0\r\n\r\n")
                        return
                    payload = reply.body if isinstance(reply.body, bytes) else \
                        json.dumps(reply.body).encode()
                    if reply.action == "truncate":
                        self.send_header("Content-Length", str(len(payload) + 100))
                        self.end_headers()
                        self.wfile.write(payload)
                        self.close_connection = True
                        return
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            request_queue_size = 256
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # resets and stalls are on purpose here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll ``predicate`` (bounded) — for effects that happen on another thread."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
