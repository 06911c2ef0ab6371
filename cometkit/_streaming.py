"""Holding a server-sent-event stream open until it ends: :class:`Stream` and its closer.

Reading the events themselves (lines, ``data``, the errors they carry) is :mod:`cometkit._sse`.

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

import json
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional

import requests

from ._bodies import body_chunks
from ._exceptions import APIConnectionError, APIError
from ._objects import ApiObject
from ._secrets import SecretFilter
from ._sse import NO_SECRETS, event_error, iter_sse_data

__all__ = ["Stream", "StreamCloser", "end_when_dropped", "nothing_to_finish"]

#: Called once when the stream ends: (error or None, usage dict or None, response model,
#: time to first chunk in seconds or None).
EndOfStream = Callable[[Optional[BaseException], Optional[dict], Optional[str], Optional[float]],
                       None]
#: Runs ``fn(*args)`` later on a normal thread; safe to call from a finalizer.
Defer = Callable[..., None]


def nothing_to_finish(*_: Any) -> None:
    """The end_of_stream of a stream whose attempt the engine already recorded (an answer
    that came whole, or a stream that failed at its first event)."""


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
        self._iterator_args = dict(secrets=secrets or NO_SECRETS, defer=defer,
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
