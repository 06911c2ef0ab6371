"""Server-sent-event streams of chat completion chunks.

A stream holds an HTTP connection and a limiter slot until it ends. It gives both back when it
is exhausted, closed, used as a context manager, or dropped, so an abandoned stream cannot
leak a slot and stall every other thread.

"Dropped" must not wait for the cyclic garbage collector: neither the iterator nor the
:class:`Stream` refers to the other through a cycle. Both hold a small :class:`_Anchor`;
the stream ends when the anchor becomes unreachable, which reference counting notices at
once (``for chunk in stream: break`` then losing the stream, or the ``for`` loop's own
iterator going away). That moment can fall anywhere (inside a lock of the limiter, of a
metrics sink, of urllib3's pool), so the finalizer only hands the ending to the engine's
queue (``defer``), which runs it on a normal thread.
"""

from __future__ import annotations

import itertools
import json
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import requests

from ._exceptions import APIConnectionError, APIError, SecretFilter, status_error_class
from ._objects import ApiObject
from ._transport import body_chunks

__all__ = ["Stream", "StreamCloser", "end_when_dropped", "iter_sse_data", "sse_lines",
           "event_error", "event_status", "read_first_event", "first_event_failure",
           "peek_first_event", "completion_as_chunk"]

#: Called once when the stream ends: (error or None, usage dict or None, response model,
#: time to first chunk in seconds or None).
EndOfStream = Callable[[Optional[BaseException], Optional[dict], Optional[str], Optional[float]],
                       None]
#: Runs ``fn(*args)`` later on a normal thread; safe to call from a finalizer.
Defer = Callable[..., None]

_BOM = b"\xef\xbb\xbf"
_NO_SECRETS = SecretFilter(None)
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
    secrets = secrets or _NO_SECRETS
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


class StreamCloser:
    """The part of a stream that must run exactly once, and what the stream learned so far
    (the ending reports it). Holds neither the stream nor its iterator."""

    def __init__(self, response: requests.Response, end_of_stream: EndOfStream) -> None:
        self.response: Optional[requests.Response] = response
        self.end_of_stream: Optional[EndOfStream] = end_of_stream
        self.lock = threading.Lock()
        self.done = False
        self.usage: Optional[dict] = None
        self.model: Optional[str] = None
        self.ttfc_s: Optional[float] = None

    def note(self, event: dict) -> None:
        """Learn the model and the usage an event carries, in each format the routes stream:
        at its top (chat and legacy completion chunks, Anthropic's ``message_delta``), or
        in the object it wraps (the Responses API's ``response``, Anthropic's
        ``message_start`` ``message``). Usage is merged, not replaced: Anthropic sends the
        input tokens at the start and the output tokens at the end."""
        inner = event.get("response") or event.get("message")
        source = inner if isinstance(inner, dict) else event
        self.model = source.get("model") or event.get("model") or self.model
        usage = event.get("usage") or source.get("usage")
        if isinstance(usage, dict) and usage:
            self.usage = {**self.usage, **usage} if self.usage else usage

    def __call__(self, error: Optional[BaseException] = None) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        response, end_of_stream = self.response, self.end_of_stream
        # drop them: an error's traceback may refer back to the iterator's frame
        self.response = self.end_of_stream = None
        try:
            if response is not None:
                response.close()
        finally:
            if end_of_stream is not None:
                end_of_stream(error, self.usage, self.model, self.ttfc_s)


class _Anchor:
    """Held by the stream and by its iterator, and by nothing else: when neither is
    reachable any more, it goes, and its finalizer ends the stream."""

    __slots__ = ("closer", "__weakref__")

    def __init__(self, closer: StreamCloser) -> None:
        self.closer = closer


def end_when_dropped(owner: Any, defer: Defer, closer: StreamCloser,
                     request_id: Optional[str]) -> weakref.finalize:
    """A finalizer that ends the stream as abandoned, through ``defer``, when ``owner`` is
    collected before the stream ended (detach it when the stream ends otherwise)."""
    finalizer = weakref.finalize(owner, defer, closer, APIConnectionError(
        "stream abandoned before its end", request_id=request_id, stage="read"))
    finalizer.atexit = False
    return finalizer


def _chunks(anchor: _Anchor, response: requests.Response, *, secrets: SecretFilter,
            defer: Defer, monotonic: Callable[[], float], started_at: float,
            request_id: Optional[str], preloaded: Optional[Iterable[Any]]
            ) -> Iterator[ApiObject]:
    """The iterator of a stream. A module function, not a method: its frame must not hold
    the :class:`Stream`, or the two would form a cycle only the garbage collector breaks."""
    closer = anchor.closer
    error: Optional[BaseException] = None
    abandoned = False
    # the transport maps a broken connection to APIConnectionError (body_chunks), with no
    # context that could quote what the server sent
    events: Iterable[str] = preloaded if preloaded is not None else iter_sse_data(
        body_chunks(response, secrets, request_id), secrets)
    try:
        for data in events:
            if isinstance(data, dict):
                chunk: Any = data
            elif data.strip() == "[DONE]":
                break
            else:
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise APIError(f"invalid JSON in stream event: {data[:200]!r}",
                                   request_id=request_id) from None
            if closer.ttfc_s is None:
                closer.ttfc_s = monotonic() - started_at
            if isinstance(chunk, dict):
                failure = event_error(chunk, request_id)
                if failure is not None:
                    raise failure
                closer.note(chunk)
            yield ApiObject(chunk, request_id)
    except GeneratorExit:
        # closed from outside: by Stream.close() (already ended), or because the iterator
        # is being dropped, maybe from deep inside another lock: end it on the engine's side
        abandoned = True
        if not closer.done:
            defer(closer, APIConnectionError("stream abandoned before its end",
                                             request_id=request_id, stage="read"))
        raise
    except APIError as exc:
        if exc.request_id is None:
            exc.request_id = request_id
        error = exc
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        if not abandoned:
            closer(error)


class Stream:
    """Iterate for :class:`ApiObject` chunks; ``close()`` or ``with`` to stop early.

    ``stream.response`` is the underlying ``requests.Response``; ``stream.usage`` holds the
    usage block when the server sent one (``stream_options={"include_usage": True}``).
    """

    def __init__(
        self,
        response: requests.Response,
        end_of_stream: EndOfStream,
        *,
        monotonic: Callable[[], float],
        started_at: float,
        request_id: Optional[str] = None,
        secrets: Optional[SecretFilter] = None,
        defer: Defer,
        preloaded: Optional[Iterable[Any]] = None,
    ) -> None:
        """
        :param secrets: blanks the API key out of every event line.
        :param defer: how an abandoned stream's ending is handed over (the client's engine
            queue): never run from the finalizer itself.
        :param preloaded: the events (``data`` strings, or chunks as dicts) to yield in
            place of reading ``response``: the events of a stream whose first one was read
            within its attempt, or the one chunk of an answer that was not an event stream;
            the response is then not read again.
        """
        self.response = response
        self.request_id = request_id
        closer = self._closer = StreamCloser(response, end_of_stream)
        anchor = self._anchor = _Anchor(closer)
        self._finalizer = end_when_dropped(anchor, defer, closer, request_id)
        self._iterator: Optional[Iterator[ApiObject]] = None
        self._iterator_args = dict(secrets=secrets or _NO_SECRETS, defer=defer,
                                   monotonic=monotonic, started_at=started_at,
                                   request_id=request_id, preloaded=preloaded)

    @property
    def usage(self) -> Optional[ApiObject]:
        usage = self._closer.usage
        return ApiObject(usage) if isinstance(usage, dict) else None

    def __iter__(self) -> Iterator[ApiObject]:
        if self._iterator is None:
            self._iterator = _chunks(self._anchor, self.response, **self._iterator_args)
        return self._iterator

    def __next__(self) -> ApiObject:
        return next(iter(self))

    def close(self) -> None:
        """Stop reading, drop the connection and give back the limiter slot."""
        self._finalizer.detach()
        self._closer(None)
        if self._iterator is not None:
            self._iterator.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Stream request_id={self.request_id} closed={self._closer.done}>"
