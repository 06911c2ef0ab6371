"""``cometkit.httpx``: code written for the openai SDK sends through a cometkit client.

The openai SDK (3.x on ``httpx2``, older releases on classic ``httpx``) and what is built on
it -- LangChain's ``ChatOpenAI``, instructor, LlamaIndex -- accept an HTTP client of their
own. :class:`Transport` is the transport such a client sends through: each request becomes
a cometkit call, admitted by the client's limiter, retried by its retry policy and recorded
by its sinks, exactly as ``client.chat.completions.create`` would be. It is the ``httpx``
sibling of :class:`cometkit.adapters.CometAdapter` and reads answers with the same code.

What the caller gets stays what the HTTP library gives, so the SDK keeps its own behaviour:
an answer (also the last error answer once cometkit's retries are over, so the SDK raises its
own ``RateLimitError`` with the real headers), or the library's own connection error (so it
raises its own ``APIConnectionError`` / ``APITimeoutError``). Never a cometkit exception.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import itertools
import json
import logging
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union
from urllib.parse import urlsplit

from ._answers import request_fields, send_attempt
from ._bodies import body_chunks
from ._engine import Sent, cut_timeout
from ._exceptions import APIConnectionError, APITimeoutError, CometError, ConfigError
from ._secrets import SecretFilter
from ._sse import event_error, fail_attempt, first_event_failure, peek_first_event, sse_lines
from ._streaming import StreamCloser, end_when_dropped, nothing_to_finish
from .plugin_api import AttemptResult
from .priorities import PRIORITY_HEADER

if TYPE_CHECKING:  # pragma: no cover
    from ._client import Client

__all__ = ["Transport", "httpx_module"]

logger = logging.getLogger("cometkit")

#: The HTTP libraries this transport serves, in the order tried when none is named.
MODULES = ("httpx2", "httpx")
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Request headers the cometkit transport sets itself (framing, host, the encodings it can
#: decode); every other header the SDK sends goes out as it is.
_OWN_REQUEST_HEADERS = frozenset({"host", "content-length", "transfer-encoding",
                                  "accept-encoding"})
#: CompleteAnswer headers that describe the body as it travelled: it reaches the SDK decoded and
#: whole (or as a decoded stream), so they would mislead it.
_TRAVEL_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def _preferred_modules() -> tuple:
    """``httpx2`` first, unless the installed openai SDK is older than 3: those send through
    classic ``httpx`` (and may refuse an ``httpx2`` client), and so does what is built on
    them."""
    try:
        version = importlib.metadata.version("openai")
    except importlib.metadata.PackageNotFoundError:
        return MODULES
    major = version.split(".", 1)[0]
    return MODULES[::-1] if major.isdigit() and int(major) < 3 else MODULES


def httpx_module(choice: Union[str, ModuleType, None] = None) -> ModuleType:
    """The HTTP library to serve: ``"httpx2"``, ``"httpx"``, a module, or (``None``) the
    one the installed openai SDK sends through, else the first installed. Raises
    :class:`ConfigError` naming the extra to install."""
    if isinstance(choice, ModuleType):
        return choice
    if choice is not None and choice not in MODULES:
        raise ConfigError(f"httpx must be one of {', '.join(MODULES)} or a module, "
                          f"got {choice!r}", key="httpx")
    for name in (choice,) if choice else _preferred_modules():
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    wanted = choice or " or ".join(MODULES)
    raise ConfigError(f"cometkit.httpx needs {wanted}: pip install 'cometkit[httpx]' "
                      "(or 'cometkit[openai]' for the openai SDK)", key="httpx")


#: Request headers read here as well as sent.
_READ_REQUEST_HEADERS = frozenset({"content-type", "authorization", "x-stainless-retry-count",
                                   PRIORITY_HEADER})
#: Request headers read here and never sent: they are meant for cometkit alone.
_CONSUMED_REQUEST_HEADERS = frozenset({PRIORITY_HEADER})


def _outgoing_headers(headers: Any) -> tuple[dict, dict]:
    """In one pass over httpx's raw headers: those to send, and those this transport reads
    (by lower-case name)."""
    outgoing, picked = {}, {}
    for raw_key, raw_value in headers.raw:
        key, value = raw_key.decode("latin-1"), raw_value.decode("latin-1")
        lower = key.lower()
        if lower in _READ_REQUEST_HEADERS:
            picked[lower] = value
        if lower not in _OWN_REQUEST_HEADERS and lower not in _CONSUMED_REQUEST_HEADERS:
            outgoing[key] = value
    return outgoing, picked


def _answer_headers(headers: Any) -> list:
    return [(k, v) for k, v in headers.items() if k.lower() not in _TRAVEL_HEADERS]


def _timeout_s(extensions: Any) -> Optional[tuple]:
    """The request's own (connect, read) timeout, as httpx hands it to its transport."""
    timeout = extensions.get("timeout") if extensions else None
    if not isinstance(timeout, dict):
        return None
    return timeout.get("connect"), timeout.get("read")


class Transport:
    """An ``httpx`` / ``httpx2`` transport that sends each request as a call of ``client``.

    ``httpx2.Client(transport=Transport(client))`` (or ``client.httpx_client()``) gives any
    code that takes an httpx client the client's limiter, retries and metrics. It sends
    only below the client's ``base_url``, through the client's own connection pool, proxies
    and TLS settings; the client is borrowed, never closed here. Safe for threads.

    :param client: the cometkit client whose plugins and connections to use.
    :param httpx: ``"httpx2"``, ``"httpx"`` or the module (default: the one the installed
        openai SDK sends through, else the first installed).
    :param priority: the lane of its requests, one of the client's ``priorities`` (``None``:
        the client's ``priority``). A request's own ``x-cometkit-priority`` header wins; the
        header is read here and never sent.
    :raises ConfigError: ``priority`` is not a lane of the client.
    """

    def __init__(self, client: Client, *, httpx: Union[str, ModuleType, None] = None,
                 priority: Optional[str] = None) -> None:
        self.client = client
        self.priority, _ = client.priorities.resolve(priority)
        self.httpx = httpx_module(httpx)
        self._event_body = _event_body_class(self.httpx)
        base = urlsplit(client.base_url)
        self._origin = (base.scheme, base.hostname, base.port or _DEFAULT_PORTS.get(base.scheme))
        self._base_path = base.path.rstrip("/")
        self._retries_seen = threading.Event()

    def handle_request(self, request: Any) -> Any:
        """Send ``request`` through the client's engine; return an httpx ``Response`` or
        raise an httpx ``RequestError`` (never a cometkit exception). An unknown lane in the
        ``x-cometkit-priority`` header raises ``ValueError`` before anything is sent (the
        openai SDK passes it on as it is: a mistake in the calling code)."""
        client = self.client
        engine = client.engine
        url = request.url
        target = self._below_base(url)
        if target is None:
            raise self.httpx.ConnectError(
                f"{url} is not below the cometkit client's base_url {client.base_url}: this "
                "transport sends only there", request=request)
        path = target.split("?", 1)[0]
        body = request.read() or None
        outgoing, picked = _outgoing_headers(request.headers)
        self._note_sdk_retry(picked.get("x-stainless-retry-count"))
        payload = request_fields(body, picked.get("content-type"))
        stream = bool(payload and payload.get("stream") is True)
        method = request.method
        lane, _rank = client.priorities.from_header(picked.get(PRIORITY_HEADER), self.priority)
        info = client.new_request(method, path, payload, stream=stream, priority=lane)
        timeout_s = _timeout_s(request.extensions)
        send, secrets = client.transport.send, client.secrets
        authorization = picked.get("authorization") or ""
        secret = authorization.split(" ", 1)[-1] if " " in authorization else None

        failed_streams: list = []  # streams that failed at their first event, still open

        def attempt(result: AttemptResult) -> Sent:
            while failed_streams:  # retried: the last attempt's stream is not needed
                failed_streams.pop().close()
            sent = send_attempt(
                result, lambda: send(method, target, body, headers=outgoing, stream=stream,
                                     timeout_s=cut_timeout(timeout_s, result.time_left_s)),
                stream=stream, method=method, route=path, secrets=secrets, secret=secret)
            if sent.streaming:
                self._read_first_event(sent, result, secrets)
                if not sent.streaming and sent.response is not None:
                    failed_streams.append(sent.response)
            return sent

        try:
            sent, result, _error, permit = engine.execute(info, attempt)
        except CometError as exc:  # the limiter could not admit the call (Redis down...)
            raise self.httpx.ConnectError(str(exc), request=request) from None
        response = sent.response
        if response is None:
            raise self._library_error(result.error, request)
        if sent.events is not None:  # a stream; one that failed at its first event, given up
            body_stream = self._event_body(  # on, reaches the SDK as it came (its own error)
                response, engine.end_of_stream(sent, result, permit) if sent.streaming
                else nothing_to_finish, sent.events, secrets=secrets,
                defer=engine.defer, monotonic=engine.clock.monotonic,
                started_at=result.started_at, request_id=sent.provider_request_id,
                errors=functools.partial(self._library_error, request=request))
            return self.httpx.Response(response.status_code,
                                       headers=_answer_headers(response.headers),
                                       stream=body_stream, request=request)
        return self.httpx.Response(response.status_code, headers=_answer_headers(response.headers),
                                   content=response.content, request=request)

    @staticmethod
    def _read_first_event(sent: Sent, result: AttemptResult, secrets: SecretFilter) -> None:
        """Read a held stream up to the end of its first event, within the attempt: one that
        fails before delivering anything (an error event first, a connection broken before
        any event) fails its attempt, for the retry policy to retry like any other (the
        client's own streams do the same, :func:`cometkit._sse.read_first_event`). The
        lines read are kept (``sent.events``) to be passed on as they came."""
        lines = sse_lines(body_chunks(sent.response, secrets, sent.provider_request_id))
        try:
            head, data = peek_first_event(lines)
        except APIConnectionError as exc:
            sent.response.close()
            sent.response, sent.streaming = None, False
            fail_attempt(result, exc)
            return
        sent.events = itertools.chain(head, lines)
        failure = first_event_failure(data, sent.provider_request_id) if data else None
        if failure is not None:
            sent.streaming = False
            fail_attempt(result, failure)

    def _below_base(self, url: Any) -> Optional[str]:
        """What follows ``base_url`` in ``url`` (path and query, as sent), or ``None``
        when ``url`` is elsewhere."""
        scheme = url.scheme
        if (scheme, url.host, url.port or _DEFAULT_PORTS.get(scheme)) != self._origin:
            return None
        raw = url.raw_path.decode("ascii")
        base = self._base_path
        if base and not (raw == base or raw.startswith((base + "/", base + "?"))):
            return None
        target = raw[len(base):]
        return target if target.startswith("/") else "/" + target

    def _note_sdk_retry(self, count: Optional[str]) -> None:
        """Warn once when the SDK retries by itself: its retries and cometkit's multiply."""
        if count and count != "0" and not self._retries_seen.is_set():
            self._retries_seen.set()
            logger.warning(
                "the SDK is retrying a request itself (x-stainless-retry-count: %s) on top of "
                "cometkit's retries: the two layers multiply. Build the SDK with "
                "max_retries=0 (client.openai() does).", count)

    def _library_error(self, error: Optional[BaseException], request: Any) -> Exception:
        """The HTTP library's exception for a connection failure cometkit mapped: the SDK
        turns it into its own ``APITimeoutError`` or ``APIConnectionError``."""
        httpx = self.httpx
        connect = getattr(error, "stage", None) == "connect"
        if isinstance(error, APITimeoutError):
            cls = httpx.ConnectTimeout if connect else httpx.ReadTimeout
        else:
            cls = httpx.ConnectError if connect else httpx.ReadError
        return cls(str(error) if error is not None else "connection failed", request=request)

    def close(self) -> None:
        """Nothing to close: the connections belong to the borrowed client."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<cometkit.httpx.Transport {self.httpx.__name__} base_url={self.client.base_url!r}>"


class _EventBody:
    """The body of an event-stream answer, handed to httpx as it arrives.

    It keeps the attempt's limiter slot until the stream ends: read to its end (or to
    ``[DONE]``), closed by the caller (the SDK closes it when its own stream ends), or dropped
    unclosed. Meanwhile it notes the model, the last ``usage`` event and the time to the
    first event for the attempt's record, and blanks the API key out of each line. A close
    may come from a garbage-collected SDK stream, inside any lock, so it only hands the
    ending to the engine (``defer``); an end reached while reading runs at once.
    """

    def __init__(self, response: Any, end_of_stream: Any, lines: Iterator[bytes], *,
                 secrets: SecretFilter, defer: Any, monotonic: Any, started_at: float,
                 request_id: Optional[str], errors: Any) -> None:
        self._response = response
        #: The stream's lines (:func:`~cometkit._bodies.body_chunks`, split), its first
        #: event's already read within the attempt.
        self._lines = lines
        self._closer = closer = StreamCloser(response, end_of_stream)
        self._secrets = secrets
        self._defer = defer
        self._monotonic = monotonic
        self._started_at = started_at
        self._request_id = request_id
        self._errors = errors
        self._failure: Optional[BaseException] = None
        self._finalizer = end_when_dropped(self, defer, closer, request_id)

    def __iter__(self) -> Iterator[bytes]:
        closer = self._closer
        broken: Optional[APIConnectionError] = None
        try:
            for line in self._lines:
                line = self._secrets.bytes(line)
                if line.startswith(b"data:"):
                    data = line[5:].strip()
                    if closer.ttfc_s is None:
                        closer.ttfc_s = self._monotonic() - self._started_at
                    if data == b"[DONE]":
                        self._end()
                        yield line + b"\n\n"
                        return
                    if closer.model is None or (b'"usage"' in data
                                                and b'"usage":null' not in data) \
                            or b'"error"' in data:
                        self._note(data)
                yield line + b"\n"
        except APIConnectionError as exc:  # mapped by the transport (body_chunks)
            broken = exc
        else:
            self._end()
            return
        self._failure = broken
        self._end()
        raise self._errors(broken)

    def _note(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        self._closer.note(event)
        failure = event_error(event, self._request_id)
        if failure is not None:
            self._failure = failure

    def _end(self) -> None:
        """The stream ended while being read: end the attempt now."""
        self._finalizer.detach()
        self._closer(self._failure)

    def close(self) -> None:
        """The caller is done with the stream, read or not: the slot goes back (handed to
        the engine, since this may run inside a garbage collection)."""
        if self._finalizer.detach() is not None:
            self._defer(self._closer, self._failure)


def _event_body_class(httpx: ModuleType) -> type:
    """:class:`_EventBody` as the library's ``SyncByteStream`` (httpx checks the type)."""
    return type("EventBody", (_EventBody, httpx.SyncByteStream), {"__module__": __name__})
