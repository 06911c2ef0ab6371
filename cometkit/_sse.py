"""Reading server-sent events: lines, ``data`` payloads, the errors events carry.

Everything here is about the bytes of an event stream and what its events mean, not about
holding one open: the BOM-proof line splitter, the ``data`` payloads with the API key blanked,
the error an event (or a whole answer to a stream request) stands for, and the first event
read within the attempt so that a stream that fails before delivering anything fails its
attempt (:func:`read_first_event`, :func:`peek_first_event`, :func:`fail_attempt`). The
client's :class:`~cometkit.Stream` and :mod:`cometkit.httpx` both read streams with it.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterable, Iterator, Optional, Union

import requests

from ._bodies import body_chunks
from ._exceptions import APIConnectionError, APIError, APIStatusError, status_error_class
from ._secrets import SecretFilter
from .plugin_api import AttemptResult

__all__ = ["iter_sse_data", "sse_lines", "event_error", "event_status", "read_first_event",
           "first_event_failure", "peek_first_event", "fail_attempt", "completion_as_chunk",
           "NO_SECRETS"]

_BOM = b"\xef\xbb\xbf"
#: The filter of a stream read without a secret to blank.
NO_SECRETS = SecretFilter(None)
#: Line starts of the SSE format besides ``data:`` (a comment starts with a colon).
_SSE_FIELDS = (b":", b"event:", b"id:", b"retry:")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Complete lines (without their end), in time linear in the body however it is cut."""
    parts: list[bytes] = []
    for chunk in chunks:
        if b"\n" not in chunk:
            parts.append(chunk)
            continue
        if parts:
            parts.append(chunk)
            chunk = b"".join(parts)
            parts = []
        *lines, rest = chunk.split(b"\n")
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line
        if rest:
            parts.append(rest)
    tail = b"".join(parts).rstrip(b"\r")
    if tail:
        yield tail


def sse_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of an event stream, without the byte-order mark the SSE spec allows at its
    very start (wherever the first chunk happened to end)."""
    lines = _split_lines(chunks)
    first = next(lines, None)
    if first is None:
        return
    yield first[len(_BOM):] if first.startswith(_BOM) else first
    yield from lines


def iter_sse_data(chunks: Iterable[bytes], secrets: Optional[SecretFilter] = None
                  ) -> Iterator[str]:
    """Yield the ``data`` payload of each server-sent event from raw byte chunks.

    Each line loses any echo of the API key (``secrets``) before it is decoded. A line that
    is not UTF-8 raises :class:`APIError` quoting its start, and so does a body that ends
    without a single event but with lines that are no part of the format (a text page, a
    UTF-16 body): it was no event stream, and zero chunks would pass for success.
    """
    secrets = secrets or NO_SECRETS
    data_lines: list[str] = []
    any_data = False
    stray: Optional[bytes] = None
    for raw_line in sse_lines(chunks):
        if not raw_line:
            if data_lines:
                yield "\n".join(data_lines)
                data_lines = []
            continue
        if not raw_line.startswith(b"data:"):
            # event:, id:, retry: and comments (":") carry nothing we use
            if stray is None and not raw_line.startswith(_SSE_FIELDS):
                stray = secrets.bytes(raw_line)[:120]
            continue
        any_data = True
        raw_line = secrets.bytes(raw_line)
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(f"a stream event is not valid UTF-8: {raw_line[:120]!r}") from None
        data_lines.append(line[6:] if line[5:6] == " " else line[5:])
    if data_lines:
        yield "\n".join(data_lines)
    elif not any_data and stray is not None:
        raise APIError(f"the answer is not a stream of server-sent events (it began {stray!r}): "
                       "check base_url")


def event_error(payload: Any, request_id: Optional[str] = None) -> Optional[APIError]:
    """The error an event (or a whole answer to a stream request) carries, if it is one:
    ``{"error": ...}`` without choices (a Responses API object's ``"error": null`` is
    none), the Responses API's ``error`` event, or its ``response.failed`` event."""
    if not isinstance(payload, dict) or payload.get("choices"):
        return None
    kind = payload.get("type")
    if payload.get("error") is not None:
        err = payload["error"]
    elif kind == "error":
        err = payload
    elif kind == "response.failed":
        inner = payload.get("response")
        err = (inner.get("error") if isinstance(inner, dict) else None) or "the response failed"
    else:
        return None
    message = err.get("message") if isinstance(err, dict) else str(err)
    code = (err.get("code") or err.get("type")) if isinstance(err, dict) else None
    return APIError(f"error in stream: {message or 'no message'}", request_id=request_id,
                    body=payload, code=str(code) if code else None)


#: Words of an error event's ``code`` / ``type`` that stand for a status a retry policy may
#: retry: a rate limit, or a server that failed or is overloaded.
_EVENT_STATUS_WORDS = (("rate_limit", 429), ("too_many", 429), ("overloaded", 503),
                       ("unavailable", 503), ("server_error", 500), ("internal", 500),
                       ("api_error", 500), ("timeout", 504))


def event_status(failure: APIError) -> Optional[int]:
    """The HTTP status an error event stands for (its ``code`` or ``type``), for the retry
    policy to decide on as it would on a status; ``None`` when it names none of them."""
    words = " ".join(str(part) for part in (failure.code, failure.type) if part).lower()
    return next((status for word, status in _EVENT_STATUS_WORDS if word in words), None)


def read_first_event(response: requests.Response, secrets: SecretFilter,
                     request_id: Optional[str]) -> tuple[Optional[Iterator[Any]],
                                                         Optional[APIError]]:
    """Read a held stream up to its first event, inside the attempt, so that a stream that
    fails before it delivered anything (an error event first, a connection broken before
    any event) fails its attempt, which the retry policy may retry like any other; once
    content was delivered, a failure can only be the stream's typed error.

    :returns: ``(events, None)``: the stream's events, the first one included (none, for an
        empty body); or ``(None, error)``: the attempt's error (an
        :class:`APIConnectionError` with stage ``read``, or the error event's typed error).
    """
    events = iter_sse_data(body_chunks(response, secrets, request_id), secrets)
    try:
        first = next(events, None)
    except APIError as exc:  # broken before any event, or no event stream at all
        exc.request_id = exc.request_id or request_id
        return None, exc
    if first is None:
        return iter(()), None
    failure = first_event_failure(first, request_id)
    if failure is not None:
        return None, failure
    return itertools.chain((first,), events), None


def first_event_failure(data: Union[str, bytes], request_id: Optional[str]
                        ) -> Optional[APIError]:
    """The error a stream's first event (its ``data``) carries in place of content, as the
    typed error of the status it names (:func:`event_status`), for the retry policy to
    decide on; ``None`` for content (or ``[DONE]``, or text that is no JSON: the stream
    itself tells)."""
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    failure = event_error(payload, request_id)
    if failure is None:
        return None
    status = event_status(failure)
    if status is None:
        return failure
    return status_error_class(status)(str(failure), status_code=status, request_id=request_id,
                                      body=payload, code=failure.code)


def peek_first_event(lines: Iterator[bytes]) -> tuple[list[bytes], Optional[bytes]]:
    """The raw lines of an event stream up to the end of its first event, and that event's
    ``data`` (its data lines joined, ``None`` when the stream ended before any): for a
    front that passes the lines on as they came (:mod:`cometkit.httpx`) yet must know, within
    the attempt, whether the stream failed before delivering anything.

    :raises APIConnectionError: the connection broke before the first event ended.
    """
    head: list[bytes] = []
    data: list[bytes] = []
    for line in lines:
        head.append(line)
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif not line and data:
            break
    return head, (b"\n".join(data) if data else None)


def fail_attempt(result: AttemptResult, failure: APIError) -> None:
    """Fill ``result`` with the failure a stream's first event (or its absence) stands for:
    the error and its code, the stage of a broken connection, the status a typed error
    names, for the retry policy to decide on as on any failed attempt."""
    result.error, result.error_code = failure, failure.code
    if isinstance(failure, APIConnectionError):
        result.error_stage = failure.stage
    elif isinstance(failure, APIStatusError):
        result.status_code = failure.status_code


def completion_as_chunk(body: dict) -> dict:
    """A whole chat completion in the shape of one stream chunk (``message`` -> ``delta``),
    so code reading ``chunk.choices[0].delta.content`` works on it unchanged."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return body
    converted = []
    for index, choice in enumerate(choices):
        if isinstance(choice, dict) and "message" in choice and "delta" not in choice:
            rest = {k: v for k, v in choice.items() if k != "message"}
            choice = {"index": index, **rest, "delta": choice["message"]}
        converted.append(choice)
    kind = "chat.completion.chunk" if body.get("object") == "chat.completion" else \
        body.get("object")
    return {**body, "object": kind, "choices": converted}
