"""Reading an answer's body off the connection: whole, or in pieces as it arrives.

A whole body is checked against its Content-Length (urllib3 1.26 does not check it); a
streamed one is read with ``read1`` so each event is seen when it arrives, whatever the
framing, and :func:`body_chunks` maps a connection that breaks mid-body to cometkit's
``APIConnectionError`` for every stream reader. Which answers are read as streams is
:func:`answers_in_events`.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import requests
from urllib3.exceptions import ProtocolError

from ._connection_errors import TRANSPORT_ERRORS, connection_error
from ._exceptions import APIConnectionError
from ._secrets import SecretFilter

__all__ = ["answers_in_events", "body_chunks", "is_event_stream", "iter_body_chunks",
           "read_body"]


def is_event_stream(headers: Any) -> bool:
    """Whether a success answer to ``stream=True`` is read as server-sent events: anything
    but a JSON or HTML answer is (a missing or odd Content-Type included), so a proxy that
    relabels the stream does not break it; JSON and HTML are whole answers (an error body,
    a completion, a gateway page), read at once like any other."""
    content_type = (headers.get("content-type") or "").lower()
    return "json" not in content_type and "html" not in content_type


def answers_in_events(response: Any, stream: bool) -> bool:
    """Whether ``response`` is read as it arrives (a stream) rather than whole."""
    return stream and response.status_code < 300 and is_event_stream(response.headers)


def read_body(response: requests.Response) -> bytes:
    """The whole body, or ``APIConnectionError(stage="read")`` when it arrived cut short.

    urllib3 2 refuses a body shorter than its Content-Length by itself; urllib3 1.26 does not
    by default, so the length is checked here for both.
    """
    content = response.content
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and "Content-Encoding" not in response.headers \
            and len(content) < int(declared):
        raise APIConnectionError(
            f"Connection broken: the body ended after {len(content)} of {declared} bytes",
            stage="read")
    return content


#: Most bytes one read of a streamed body asks for; a read returns what has arrived, up to this.
_STREAM_READ_BYTES = 65536


def iter_body_chunks(response: requests.Response) -> Iterator[bytes]:
    """The (decoded) body of a streamed answer, in pieces as they arrive off the socket.

    ``requests``' ``iter_content(chunk_size=None)`` yields per chunk only for chunked
    encoding: a body delimited by connection close (HTTP/1.0, or HTTP/1.1 without chunked
    encoding, as some proxies send server-sent events) or by Content-Length is read to its
    end before anything is yielded. ``read1`` returns whatever one socket read gives, so
    each event is seen when it arrives, whatever the framing. Raises ``urllib3`` exceptions
    (map them with :func:`connection_error`); a body cut short of its Content-Length raises
    ``ProtocolError``.
    """
    raw = response.raw
    read1 = getattr(raw, "read1", None)  # urllib3 >= 2.1; 1.26 has none
    while True:
        data = read1(_STREAM_READ_BYTES, decode_content=True) if read1 is not None \
            else _read1_urllib3_126(raw)
        if not data:
            break
        yield data
    remaining = getattr(raw._fp, "length", None) if getattr(raw, "_fp", None) else None
    if not getattr(raw, "chunked", False) and remaining:
        raise ProtocolError(f"Connection broken: the body ended {remaining} bytes short of its "
                            "Content-Length")


def _read1_urllib3_126(raw: Any) -> bytes:
    """One ``read1`` on urllib3 1.26's response, with the decoding and error mapping its own
    ``read`` applies (1.26 has no ``read1``; these are its helpers for ``read``)."""
    fp = raw._fp
    if fp is None:
        return b""
    with raw._error_catcher():
        data = fp.read1(_STREAM_READ_BYTES)
        raw._init_decoder()
        return raw._decode(data, True, not data)


def body_chunks(response: requests.Response, secrets: Optional[SecretFilter] = None,
                request_id: Optional[str] = None) -> Iterator[bytes]:
    """:func:`iter_body_chunks` with the transport's errors mapped to cometkit's
    (:func:`connection_error`, carrying ``request_id``): what every stream reads its events
    from, so a connection that breaks mid-stream is the same ``APIConnectionError`` (stage
    ``read``) whoever reads it. The error is raised outside the handler, so it carries no
    context: the HTTP library's exception may quote what the server sent."""
    chunks = iter_body_chunks(response)
    while True:
        broken: Optional[APIConnectionError] = None
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except TRANSPORT_ERRORS as exc:
            broken = connection_error(exc, secrets)
            broken.request_id = request_id
        if broken is not None:
            raise broken
        yield chunk
