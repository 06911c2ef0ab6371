"""A loopback server that misbehaves at the byte level, one way per test.

``tests/scripted_server.py`` speaks correct HTTP through ``http.server``; this one writes the
raw bytes itself, so it can do what no well-behaved server does: drip an answer a few bytes
at a time, go silent after the headers, reset the connection halfway through a body or a
stream, delimit a body by closing the connection (HTTP/1.0, or HTTP/1.1 with neither
Content-Length nor chunked encoding), lie about the encoding, send huge bodies and headers,
send a malformed status or chunk line, and echo the API key back through every channel
(headers, an error body, a success body, JSON escapes, an event, a redirect location).

Each behaviour is a function ``(wire, request) -> None`` that writes the whole answer to
``wire``; it must serve a stream request (``request.wants_stream``) and a plain one. Every
wait is bounded (``wire.wait``) and ends at once when the server stops.
"""

from __future__ import annotations

import gzip
import json
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

#: How long a silent behaviour stays silent at most (the client's read timeout is far lower).
SILENCE_S = 10.0
#: Size of the "huge" bodies and events.
HUGE_BYTES = 8 * 1024 * 1024


@dataclass
class Request:
    method: str
    path: str
    headers: dict  # lower-case names
    body: bytes

    @property
    def key(self) -> str:
        """The API key the client sent (for behaviours that echo it)."""
        return self.headers.get("authorization", "").removeprefix("Bearer ")

    @property
    def wants_stream(self) -> bool:
        try:
            return bool(json.loads(self.body or b"{}").get("stream"))
        except (ValueError, AttributeError):
            return False


@dataclass
class Wire:
    """The connection of one request, as a behaviour writes to it."""

    sock: socket.socket
    stop: threading.Event
    sent: list = field(default_factory=list)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait(self, seconds: float) -> None:
        """Sleep, but never past the server's stop."""
        self.stop.wait(seconds)

    def reset(self) -> None:
        """Abort the connection with a TCP RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


Behaviour = Callable[[Wire, Request], None]


def head(status: str = "200 OK", headers: Optional[dict] = None, *,
         version: str = "HTTP/1.1") -> bytes:
    lines = [f"{version} {status}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def completion(content: str = "hi", model: str = "m1") -> dict:
    return {"id": "chatcmpl-x", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def events(*payloads: Any) -> bytes:
    """An SSE body: each payload as one ``data:`` event, then ``[DONE]``."""
    out = b""
    for payload in payloads:
        text = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
        out += b"data: " + (text if isinstance(text, bytes) else text.encode()) + b"\n\n"
    return out + b"data: [DONE]\n\n"


def chunk_events(model: str = "m1") -> list:
    return [{"id": "c", "model": model, "choices": [{"delta": {"content": "Hel"}}]},
            {"id": "c", "model": model, "choices": [{"delta": {"content": "lo"}}]}]


def answer_body(request: Request, model: str = "m1") -> tuple[bytes, str]:
    """What a well-behaved server would send for ``request``: (body, content type)."""
    if request.wants_stream:
        return events(*chunk_events(model)), "text/event-stream"
    return json.dumps(completion(model=model)).encode(), "application/json"


def framed(body: bytes, content_type: str, **headers: str) -> bytes:
    return head("200 OK", {"Content-Type": content_type, "Content-Length": str(len(body)),
                           "Connection": "close", **headers}) + body


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# -- the behaviours ---------------------------------------------------------------------------


def slow_drip(wire: Wire, request: Request) -> None:
    """A correct answer, a few bytes at a time (each gap far below the read timeout)."""
    body, kind = answer_body(request)
    data = framed(body, kind)
    step = max(1, len(data) // 24)
    for start in range(0, len(data), step):
        wire.send(data[start:start + step])
        wire.wait(0.01)


def silence_after_headers(wire: Wire, request: Request) -> None:
    _, kind = answer_body(request)
    wire.send(head("200 OK", {"Content-Type": kind, "Content-Length": "5000",
                              "Connection": "close"}))
    wire.wait(SILENCE_S)


def silence_mid_stream(wire: Wire, request: Request) -> None:
    wire.send(head("200 OK", {"Content-Type": "text/event-stream", "Connection": "close"}))
    wire.send(b"data: " + json.dumps(chunk_events()[0]).encode() + b"\n\n")
    wire.wait(SILENCE_S)


def reset_mid_body(wire: Wire, request: Request) -> None:
    body, kind = answer_body(request)
    wire.send(framed(body, kind)[: -len(body) // 2])
    wire.reset()


def reset_mid_stream(wire: Wire, request: Request) -> None:
    wire.send(head("200 OK", {"Content-Type": "text/event-stream",
                              "Transfer-Encoding": "chunked"}))
    event = b"data: " + json.dumps(chunk_events()[0]).encode() + b"\n\n"
    wire.send(chunked(event)[:-5])  # one event, no [DONE], no end chunk
    wire.reset()


def close_delimited_http10(wire: Wire, request: Request) -> None:
    body, kind = answer_body(request)
    wire.send(head("200 OK", {"Content-Type": kind}, version="HTTP/1.0") + body)


def close_delimited_http11(wire: Wire, request: Request) -> None:
    body, kind = answer_body(request)
    wire.send(head("200 OK", {"Content-Type": kind, "Connection": "close"}) + body)


def gzip_that_is_not(wire: Wire, request: Request) -> None:
    body, kind = answer_body(request)
    wire.send(framed(body, kind, **{"Content-Encoding": "gzip"}))


def gzip_unasked(wire: Wire, request: Request) -> None:
    """Really gzip-compressed, though a stream request asked for identity."""
    body, kind = answer_body(request)
    wire.send(framed(gzip.compress(body), kind, **{"Content-Encoding": "gzip"}))


def not_utf8(wire: Wire, request: Request) -> None:
    if request.wants_stream:
        body = b'data: {"model": "m\xff\xfe1", "choices": []}\n\n'
        wire.send(framed(body, "text/event-stream"))
    else:
        wire.send(framed(b'{"model": "m\xff\xfe1"}', "application/json"))


def utf16_with_bom(wire: Wire, request: Request) -> None:
    body, kind = answer_body(request)
    wire.send(framed(body.decode().encode("utf-16"), kind + "; charset=utf-16"))


def bom_and_crlf(wire: Wire, request: Request) -> None:
    body, kind = answer_body(request)
    wire.send(framed(b"\xef\xbb\xbf" + body.replace(b"\n", b"\r\n"), kind))


def bad_chunk_line(wire: Wire, request: Request) -> None:
    wire.send(head("200 OK", {"Content-Type": "text/event-stream" if request.wants_stream
                              else "application/json", "Transfer-Encoding": "chunked"}))
    wire.send(b"zz-" + request.key.encode() + b"\r\nxx\r\n")


def bad_status_line(wire: Wire, request: Request) -> None:
    wire.send(b"HTTP/1.1 2x0 " + request.key.encode() + b"\r\n\r\n")


def too_many_headers(wire: Wire, request: Request) -> None:
    body, kind = answer_body(request)
    many = {f"X-Many-{i}": request.key for i in range(150)}
    wire.send(framed(body, kind, **many))


def huge_header(wire: Wire, request: Request) -> None:
    body, kind = answer_body(request)
    wire.send(framed(body, kind, **{"X-Huge": "h" * 100_000 + request.key}))


def huge_body(wire: Wire, request: Request) -> None:
    content = "x" * HUGE_BYTES
    if request.wants_stream:
        event = {"id": "c", "model": "m1", "choices": [{"delta": {"content": content}}]}
        wire.send(framed(events(event), "text/event-stream"))
    else:
        wire.send(framed(json.dumps(completion(content)).encode(), "application/json"))


def huge_line_without_end(wire: Wire, request: Request) -> None:
    """Megabytes without a newline, then the connection closes."""
    wire.send(head("200 OK", {"Content-Type": "text/event-stream" if request.wants_stream
                              else "application/json", "Connection": "close"}))
    for _ in range(HUGE_BYTES // 65536):
        wire.send(b"data: " + b"y" * 65530)


def json_escaped(key: str) -> str:
    """The key as JSON with every other character ``\\u`` escaped (valid JSON for the key)."""
    return "".join(f"\\u{ord(c):04x}" if i % 2 else c for i, c in enumerate(key))


def echo_in_headers(wire: Wire, request: Request) -> None:
    """The key as the request id and in other headers of a correct answer."""
    body, kind = answer_body(request)
    wire.send(framed(body, kind, **{"x-request-id": request.key, "X-Echo": request.key}))


def echo_in_escaped_json(wire: Wire, request: Request) -> None:
    """The key, JSON-escaped, as the answer's model (which the metrics record) and text."""
    escaped = json_escaped(request.key)
    if request.wants_stream:
        body = events('{"id": "c", "model": "MODEL", "choices": [{"delta": {"content": '
                      '"TEXT"}}]}'.replace("MODEL", escaped).replace("TEXT", escaped))
        kind = "text/event-stream"
    else:
        body = json.dumps(completion(model="MODEL", content="TEXT")).replace(
            "MODEL", escaped).replace("TEXT", escaped).encode()
        kind = "application/json"
    wire.send(framed(body, kind, **{"x-request-id": json_escaped(request.key)}))


def echo_in_error_status(wire: Wire, request: Request) -> None:
    body = ('{"error": {"message": "Incorrect API key provided: ESCAPED", '
            '"code": "invalid_api_key", "param": "KEY"}}').replace(
        "ESCAPED", json_escaped(request.key)).replace("KEY", request.key).encode()
    wire.send(head("401 Unauthorized", {"Content-Type": "application/json",
                                        "Content-Length": str(len(body)),
                                        "x-request-id": request.key,
                                        "Connection": "close"}) + body)


def echo_in_error_event(wire: Wire, request: Request) -> None:
    """An error where an answer should be: as an SSE event, or as a 200 JSON body."""
    error = {"error": {"message": f"key {request.key} is not allowed", "code": "bad_key"}}
    if request.wants_stream:
        wire.send(framed(events(chunk_events()[0], error), "text/event-stream"))
    else:
        wire.send(framed(json.dumps(error).encode(), "application/json"))


def echo_in_non_json(wire: Wire, request: Request) -> None:
    """A text that is not JSON, holding the key: a plain body, or an event line."""
    if request.wants_stream:
        wire.send(framed(b"data: your key is " + request.key.encode() + b"\n\n",
                         "text/event-stream"))
    else:
        wire.send(framed(b"your key is " + request.key.encode(), "text/plain"))


def echo_in_json_to_stream(wire: Wire, request: Request) -> None:
    """A plain JSON error body (no events) even to a stream request, holding the key."""
    body = json.dumps({"error": {"message": f"quota of {request.key} is spent",
                                 "code": "insufficient_quota"}}).encode()
    wire.send(framed(body, "application/json"))


def echo_in_redirect(wire: Wire, request: Request) -> None:
    location = "http://127.0.0.1:9/v1/chat?key=" + "".join(
        f"%{ord(c):02X}" if c == "-" else c for c in request.key)
    wire.send(head("302 Found", {"Location": location, "Content-Length": "0",
                                 "Connection": "close"}))


def echo_in_html(wire: Wire, request: Request) -> None:
    body = f"<html><head><title>Denied {request.key}</title></head></html>".encode()
    wire.send(head("200 OK", {"Content-Type": "text/html", "Content-Length": str(len(body)),
                              "Connection": "close"}) + body)


BEHAVIOURS: dict[str, Behaviour] = {fn.__name__: fn for fn in (
    slow_drip, silence_after_headers, silence_mid_stream, reset_mid_body, reset_mid_stream,
    close_delimited_http10, close_delimited_http11, gzip_that_is_not, gzip_unasked, not_utf8,
    utf16_with_bom, bom_and_crlf, bad_chunk_line, bad_status_line, too_many_headers,
    huge_header, huge_body, huge_line_without_end, echo_in_headers, echo_in_escaped_json,
    echo_in_error_status, echo_in_error_event, echo_in_non_json, echo_in_json_to_stream,
    echo_in_redirect, echo_in_html,
)}


# -- the server -------------------------------------------------------------------------------

_MAX_HEAD = 64 * 1024


def _read_request(sock: socket.socket) -> Optional[Request]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece or len(data) > _MAX_HEAD:
            return None
        data += piece
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    request_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    method, path, _version = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length") or 0)
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            return None
        body += piece
    return Request(method, path, headers, body[:length])


class MisbehavingServer:
    """``with MisbehavingServer(behaviour) as srv``: every request gets ``behaviour``; the
    connection closes after each answer. ``srv.requests`` lists what arrived."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[Request] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(SILENCE_S * 2)
                try:
                    request = _read_request(sock)
                    if request is None:
                        return
                    with server.lock:
                        server.requests.append(request)
                    server.behaviour(Wire(sock, server.stop), request)
                except OSError:
                    pass  # the client gave up first: that is what some tests want

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 64

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # misbehaving is the point

        self.tcp = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.tcp.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.tcp.server_address[1]}/v1"

    def __enter__(self) -> MisbehavingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.tcp.shutdown()
        self.tcp.server_close()
        self.thread.join(timeout=5)
