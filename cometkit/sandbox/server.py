"""The sandbox: a rate-limited, fault-injecting CometAPI stand-in on loopback.

``with Sandbox(rpm=600) as sb:`` serves an OpenAI-compatible API at ``sb.base_url`` from a
background thread, so a client (or a test) can be driven against a provider that behaves like a
real one under load, without a key or a network. Standard library only, and lean per request:
benchmarks push thousands of calls through it.
"""

from __future__ import annotations

import email.utils
import hmac
import http
import itertools
import json
import logging
import math
import random
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

from .._multipart import decode_upload
from ..clock import Clock, SystemClock
from . import responses, routes
from .faults import FaultPlan, FaultSpec
from .limits import (
    HEADER_FAMILIES,
    WINDOW_ALIGNS,
    WINDOW_RETRY_AFTERS,
    Admission,
    RateLimits,
    go_duration,
)
from .stats import Counters, Outcome
from .store import Store, StoreError

__all__ = ["Sandbox", "RETRY_AFTER_STYLES", "HEADER_FAMILIES", "WINDOW_ALIGNS",
           "WINDOW_RETRY_AFTERS", "IN_FLIGHT_STYLES", "OVERLOAD_STYLES"]

log = logging.getLogger("cometkit.sandbox")

#: How a 429 tells the client when to come back.
RETRY_AFTER_STYLES = ("seconds", "ms", "date", "reset", "none")

#: How a 429 for ``max_in_flight`` is worded: as OpenAI would, or as LiteLLM's
#: ``max_parallel_requests`` limiter does (with its window as ``Retry-After``).
IN_FLIGHT_STYLES = ("openai", "litellm")
#: How a 429 for a bucket limit is worded: as OpenAI does, or as gateways built on new-api pass
#: an upstream overload on (``insufficient_quota`` that nonetheless means "try later").
OVERLOAD_STYLES = ("openai", "new-api")
#: ``in_flight_style="litellm"`` hints this by default: LiteLLM's default window, a minute.
LITELLM_IN_FLIGHT_RETRY_AFTER_S = 60.0

#: Request bodies above this are refused (the sandbox is not a storage service).
MAX_BODY_BYTES = 64 * 1024 * 1024

_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\nServer: cometkit-sandbox\r\n"
    for status in http.HTTPStatus
}
#: ``path -> {method: kind}`` of the routes the sandbox serves; ``{id}`` is one path segment.
_ROUTES = {
    "/v1/chat/completions": {"POST": "chat"},
    "/v1/embeddings": {"POST": "embeddings"},
    "/v1/models": {"GET": "models"},
    "/v1/models/{id}": {"GET": "model"},
    "/v1/responses": {"POST": "responses"},
    "/v1/responses/{id}": {"GET": "response_get", "DELETE": "response_delete"},
    "/v1/completions": {"POST": "completions"},
    "/v1/messages": {"POST": "messages"},
    "/v1/moderations": {"POST": "moderations"},
    "/v1/images/generations": {"POST": "images"},
    "/v1/audio/speech": {"POST": "speech"},
    "/v1/audio/transcriptions": {"POST": "transcriptions"},
    "/v1/files": {"POST": "file_upload"},
    "/v1/files/{id}": {"GET": "file_get"},
    "/v1/files/{id}/content": {"GET": "file_content"},
    "/v1/batches": {"POST": "batch_create", "GET": "batch_list"},
    "/v1/batches/{id}": {"GET": "batch_get"},
    "/v1/batches/{id}/cancel": {"POST": "batch_cancel"},
}
#: Kinds whose request is a JSON body to plan (their model is rate-limited).
_PLANNED_JSON = ("chat", "embeddings") + tuple(k for k in routes.ROUTE_KINDS
                                               if k != "transcriptions")
_JSON = "application/json"
_LINGER_RESET = struct.pack("ii", 1, 0)

_date_cache = (0, "")


def _date_header() -> str:
    """``Date: ...\\r\\n``, formatted at most once a second."""
    global _date_cache
    now = int(time.time())
    stamp, text = _date_cache
    if stamp != now:
        text = f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n"
        _date_cache = (now, text)
    return text


class _Call:
    """One attempt as the handler tracks it."""

    __slots__ = ("number", "request_id", "model", "admitted", "finished")

    def __init__(self, number: int) -> None:
        self.number = number
        self.request_id = f"req_sandbox_{number}"
        self.model: Optional[str] = None
        #: Holds a rate-limit slot to give back.
        self.admitted = False
        self.finished = False


class _Aborted(Exception):
    """The sandbox is stopping: drop the request without an answer."""


class Sandbox:
    """An OpenAI-compatible server on loopback that behaves like a provider under load.

    :param port: TCP port; 0 picks a free one (read it from :attr:`base_url`).
    :param host: interface to bind; loopback by default (never expose the sandbox).
    :param rpm: requests per minute per model (token bucket), ``None`` for no limit.
    :param rps: requests per second per model, an alternative to ``rpm``.
    :param tpm: tokens per minute per model; a request costs its prompt plus ``max_tokens``
        (or its answer when unset). The bucket holds one second's worth.
    :param burst: request bucket capacity; default one second's worth, at least 1.
    :param max_in_flight: requests per model served at once; more are answered 429.
    :param latency_s: added to every admitted request before it is answered.
    :param fault_rate: probability of an injected fault, spread over ``faults``.
    :param faults: fault kinds (see :data:`~cometkit.sandbox.faults.FAULT_KINDS`; default
        500, 502, 503, reset), or a mapping kind -> probability instead of ``fault_rate``.
    :param seed: seeds the fault draws, so a run repeats exactly.
    :param api_key: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
    :param retry_after: how a 429 hints the wait: ``seconds`` (``Retry-After: 2``), ``ms``
        (``retry-after-ms``), ``date`` (``Retry-After`` as an HTTP-date), ``reset`` (only
        ``x-ratelimit-reset-requests``) or ``none`` (no hint at all).
    :param models: what ``GET /v1/models`` lists (any model name is served).
    :param always_429: answer every API request 429 with a ``retry_after_value_s`` hint.
    :param retry_after_value_s: the wait hinted in ``always_429`` mode.
    :param slow_s: how late a ``slow`` fault answers.
    :param clock: the clock of the rate limits and HTTP dates; tests pass a fake one.
    :param window_requests: requests per model per fixed window of ``window_s`` (instead of
        ``rpm`` / ``rps``), as gateways count them.
    :param window_s: the window's length (default a minute).
    :param window_align: ``first_request`` (a window opens with the first request admitted
        after the previous one ended, as LiteLLM's proxy) or ``clock`` (``[k*W, (k+1)*W)`` of
        ``clock.time()``: a calendar minute, as LiteLLM's router).
    :param window_retry_after: what a window's 429 hints: ``left`` (the time left in it),
        ``window`` (its length, LiteLLM's inflated value) or ``none`` (no hint and no reset
        headers), rendered in the ``retry_after`` style.
    :param token_ratio: the sandbox's tokenizer counts this many times the chars/4 estimate for
        a prompt, in ``usage.prompt_tokens`` and in the ``tpm`` charge.
    :param token_window_s: enforce ``tpm`` per fixed window of this length
        (``tpm * token_window_s / 60`` tokens each) instead of a bucket.
    :param ratelimit_headers: the header names: one of :data:`HEADER_FAMILIES`.
    :param in_flight_style: how ``max_in_flight`` 429s are worded: one of
        :data:`IN_FLIGHT_STYLES`.
    :param in_flight_retry_after_s: the wait a ``max_in_flight`` 429 hints (default: the
        latency, at least 0.1 s, in ``openai`` style; a minute in ``litellm`` style).
    :param overload_style: how bucket-limit 429s are worded: one of :data:`OVERLOAD_STYLES`.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        burst: Optional[float] = None,
        max_in_flight: Optional[int] = None,
        latency_s: float = 0.0,
        fault_rate: float = 0.0,
        faults: FaultSpec = None,
        seed: Optional[int] = None,
        api_key: Optional[str] = None,
        retry_after: str = "seconds",
        models: Optional[Sequence[str]] = None,
        rps: Optional[float] = None,
        always_429: bool = False,
        retry_after_value_s: float = 1.0,
        slow_s: float = 5.0,
        clock: Optional[Clock] = None,
        window_requests: Optional[int] = None,
        window_s: Optional[float] = None,
        window_align: str = "first_request",
        window_retry_after: str = "left",
        token_ratio: float = 1.0,
        token_window_s: Optional[float] = None,
        ratelimit_headers: str = "openai",
        in_flight_style: str = "openai",
        in_flight_retry_after_s: Optional[float] = None,
        overload_style: str = "openai",
    ) -> None:
        for name, value in (("rpm", rpm), ("rps", rps), ("tpm", tpm), ("burst", burst)):
            _check_number(name, value)
        _check_number("max_in_flight", max_in_flight, integer=True)
        for name, value in (("latency_s", latency_s), ("slow_s", slow_s),
                            ("retry_after_value_s", retry_after_value_s)):
            _check_number(name, value, zero=True, optional=False)
        if rpm is not None and rps is not None:
            raise ValueError("give rpm or rps, not both")
        if burst is not None and rpm is None and rps is None:
            raise ValueError("burst needs rpm or rps")
        if retry_after not in RETRY_AFTER_STYLES:
            raise ValueError(f"retry_after must be one of {', '.join(RETRY_AFTER_STYLES)}")
        if api_key is not None and not api_key:
            raise ValueError("api_key must not be empty (pass None for no authentication)")
        _check_limit_shapes(locals())
        self.port = port
        self.host = host
        self.latency_s = float(latency_s)
        self.slow_s = float(slow_s)
        self.retry_after = retry_after
        self.retry_after_value_s = float(retry_after_value_s)
        self.always_429 = always_429
        self.models = tuple(models) if models is not None else responses.DEFAULT_MODELS
        self.clock: Clock = clock or SystemClock()
        self._config = {
            "rpm": rpm, "rps": rps, "tpm": tpm, "burst": burst, "max_in_flight": max_in_flight,
            "latency_s": self.latency_s, "fault_rate": fault_rate, "faults": faults,
            "seed": seed, "retry_after": retry_after, "always_429": always_429,
            "window_requests": window_requests, "window_s": window_s,
            "window_align": window_align, "window_retry_after": window_retry_after,
            "token_ratio": token_ratio, "token_window_s": token_window_s,
            "ratelimit_headers": ratelimit_headers, "in_flight_style": in_flight_style,
            "in_flight_retry_after_s": in_flight_retry_after_s, "overload_style": overload_style,
        }
        self._token_ratio = float(token_ratio)
        self._in_flight_litellm = in_flight_style == "litellm"
        self._overload_new_api = overload_style == "new-api"
        self._max_in_flight = max_in_flight
        if in_flight_retry_after_s is None:
            in_flight_retry_after_s = (LITELLM_IN_FLIGHT_RETRY_AFTER_S if self._in_flight_litellm
                                       else max(self.latency_s, 0.1))
        self._expected_auth = f"Bearer {api_key}".encode() if api_key is not None else None
        self._faults = FaultPlan(fault_rate, faults)
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self._limits: Optional[RateLimits] = None
        if rpm or rps or tpm or max_in_flight or window_requests:
            self._limits = RateLimits(
                requests_per_s=rpm / 60.0 if rpm else rps,
                request_burst=burst,
                request_limit=rpm if rpm else (rps * 60.0 if rps else None),
                tpm=tpm,
                max_in_flight=max_in_flight,
                in_flight_retry_s=float(in_flight_retry_after_s),
                monotonic=self.clock.monotonic,
                window_requests=window_requests,
                window_s=float(window_s or 60.0),
                token_window_s=token_window_s,
                window_align=window_align,
                window_retry_after=window_retry_after,
                header_family=ratelimit_headers,
                reset_on_refusal=retry_after != "none",
                wall_time=self.clock.time,
            )
        self._counters = Counters()
        self._ids = itertools.count(1)
        self._store = Store(self._answer_line, self.clock.time)
        self._stopping = threading.Event()
        self._connections: set = set()
        self._connections_lock = threading.Lock()
        self._httpd: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Sandbox:
        """Bind and serve from a daemon thread. Raises ``OSError`` when the port is taken."""
        if self._httpd is not None:
            raise RuntimeError("the sandbox is already running")
        self._stopping.clear()
        httpd = _Server((self.host, self.port), self)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"cometkit-sandbox-{self.address[1]}", daemon=True)
        self._thread.start()
        log.debug("sandbox listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving: close the listener and every open connection, abandon slow answers."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.debug("sandbox stopped")

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def address(self) -> tuple:
        """``(host, port)`` the sandbox listens on."""
        if self._httpd is None:
            raise RuntimeError("the sandbox is not running; use start() or a with block")
        return self._httpd.server_address[:2]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: what a client takes as its base URL."""
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def describe(self) -> str:
        """The settings that differ from a plain echo server, for a log line."""
        defaults = {"latency_s": 0.0, "fault_rate": 0.0, "retry_after": "seconds",
                    "always_429": False, "window_align": "first_request",
                    "window_retry_after": "left", "token_ratio": 1.0,
                    "ratelimit_headers": "openai", "in_flight_style": "openai",
                    "overload_style": "openai"}
        parts = [f"{key}={int(value) if isinstance(value, float) and value.is_integer() else value}"
                 for key, value in self._config.items()
                 if value is not None and (key not in defaults or value != defaults[key])]
        return ", ".join(parts) or "no limits, no faults"

    def __repr__(self) -> str:
        where = self.base_url if self._httpd is not None else "stopped"
        return f"Sandbox({where}, {self.describe()})"

    # -- counters ----------------------------------------------------------------------------

    def stats(self) -> dict:
        """What the sandbox saw since it started or since :meth:`reset_stats`.

        Keys: ``attempts``; ``attempts_by_status`` (status code, or ``reset``, ``truncated``,
        ``aborted`` -> count); ``requests_by_model``; ``in_flight``; ``max_in_flight_seen``
        and ``max_in_flight_seen_by_model``; ``connections_accepted``; ``faults_injected``
        (kind -> count); ``rate_limited`` (``requests``, ``tokens``, ``window``,
        ``in_flight``, ``always`` -> count of 429s).
        """
        return self._counters.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (rate-limit buckets keep their state)."""
        self._counters.reset()

    # -- connections (called from handler threads) --------------------------------------------

    def _opened(self, connection: socket.socket) -> None:
        self._counters.connection()
        with self._connections_lock:
            self._connections.add(connection)

    def _closed(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    # -- requests -----------------------------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        path = handler.path.partition("?")[0]
        if path.startswith("/_sandbox/"):
            self._control(handler, path)
            return
        call = _Call(next(self._ids))
        self._counters.begin()
        try:
            self._answer(handler, path, call)
        except _Aborted:
            handler.close_connection = True
        finally:
            self._finish(call, "aborted")

    def _finish(self, call: _Call, outcome: Outcome) -> None:
        """Count the attempt and free its slot -- before the answer is written, so a client
        that has its answer finds the counters up to date and may send its next request."""
        if call.finished:
            return
        call.finished = True
        if call.admitted:
            self._limits.release(call.model)
        self._counters.end(outcome, call.model)

    def _answer(self, handler: _Handler, path: str, call: _Call) -> Outcome:
        body = _read_body(handler)
        if body is None:
            handler.close_connection = True
            return self._error(handler, call, 400, "Could not read the request body.",
                               "invalid_request_error")
        methods, ident = _route(path)
        if methods is None:
            return self._error(handler, call, 404, f"Invalid URL ({handler.command} {path})",
                               "invalid_request_error", "unknown_url")
        kind = methods.get(handler.command)
        if kind is None:
            return self._error(handler, call, 405, f"Invalid method for {path}: use "
                               f"{' or '.join(methods)}.", "invalid_request_error",
                               "method_not_allowed")
        if self._expected_auth is not None:
            refusal = self._check_auth(handler)
            if refusal:
                return self._error(handler, call, 401, refusal, "invalid_request_error",
                                   "invalid_api_key")
        plan: Any = None
        document: Any = None
        if kind in _PLANNED_JSON or kind == "batch_create":
            try:
                document = json.loads(body)
            except ValueError:
                return self._error(handler, call, 400, "We could not parse the JSON body of "
                                   "your request.", "invalid_request_error")
        elif kind in ("transcriptions", "file_upload"):
            document = decode_upload(handler.headers.get("Content-Type"), body)
            if document is None:
                return self._error(handler, call, 400, "The body must be multipart/form-data "
                                   "with a file.", "invalid_request_error")
        if kind in _PLANNED_JSON or kind == "transcriptions":
            try:
                plan = _plan(kind, document, self._token_ratio)
            except responses.BadRequest as exc:
                return self._error(handler, call, 400, str(exc), "invalid_request_error",
                                   param=exc.param)
            call.model = plan.model
            self._counters.model(plan.model)
        if self.always_429:
            self._counters.rate_limited("always")
            return self._too_many(handler, call, "requests", self.retry_after_value_s, (),
                                  "Rate limit reached (the sandbox answers every request 429).")
        admission: Optional[Admission] = None
        if plan is not None and self._limits is not None:
            admission = self._limits.admit(plan.model, plan.charge)
            if not admission.ok:
                return self._refused(handler, call, admission)
            call.admitted = True
        return self._admitted(handler, call, kind, ident, plan, document,
                              admission.headers if admission is not None else ())

    def _admitted(self, handler: _Handler, call: _Call, kind: str, ident: Optional[str],
                  plan: Any, document: Any, headers: tuple) -> Outcome:
        fault = None
        if self._faults:
            with self._random_lock:
                fault = self._faults.pick(self._random.random())
        if fault is not None:
            self._counters.fault(fault)
        delay = self.latency_s + (self.slow_s if fault == "slow" else 0.0)
        if delay > 0 and self._stopping.wait(delay):
            raise _Aborted
        if fault is not None and fault != "slow":
            return self._inject(handler, call, fault, plan)
        created = int(self.clock.time())
        if getattr(plan, "stream", False):
            events = _stream_events(plan, call.number, created)
            if kind == "responses":
                self._keep_response(plan, call.number, created)
            return self._send_events(handler, call, events, headers)
        content_type = _JSON
        if kind == "chat":
            body = responses.chat_body(plan, call.number, created)
        elif kind == "embeddings":
            body = responses.embeddings_body(plan)
        elif kind == "models":
            body = responses.models_body(self.models, created)
        elif kind == "model":
            if ident not in self.models:
                return self._error(handler, call, 404, f"The model '{ident}' does not exist",
                                   "invalid_request_error", "model_not_found", "model")
            body = responses.model_body(ident, created)
        elif plan is not None:
            body, content_type = routes.answer(plan, call.number, created, self._origin())
            if kind == "responses":
                self._keep_response(plan, call.number, created, body)
        else:
            try:
                body, content_type = self._stored(kind, ident, document, handler.path)
            except StoreError as exc:
                return self._error(handler, call, exc.status, str(exc),
                                   "invalid_request_error", exc.code, exc.param)
        return self._send(handler, 200, call, body, headers, content_type=content_type)

    def _origin(self) -> str:
        return self.base_url[:-len("/v1")]

    def _keep_response(self, plan: Any, number: int, created: int,
                       body: Optional[bytes] = None) -> None:
        """Store a response for ``GET /v1/responses/{id}``, unless it asked ``store: false``."""
        if plan.document.get("store", True) is not False:
            if body is None:
                body = json.dumps(routes.response_object(plan, number, created),
                                  separators=(",", ":")).encode()
            self._store.keep_response(f"resp_sandbox_{number}", body)

    def _stored(self, kind: str, ident: Optional[str], document: Any,
                target: str) -> tuple[bytes, str]:
        """``(body, content type)`` of a route of the store (files, batches, responses)."""
        store = self._store
        if kind == "file_content":
            return store.file_content(ident or ""), "application/octet-stream"
        if kind == "batch_list":
            query = urllib.parse.parse_qs(target.partition("?")[2])
            return store.list_batches((query.get("after") or [None])[0],
                                      (query.get("limit") or [None])[0]), _JSON
        calls = {"file_upload": lambda: store.upload(document),
                 "file_get": lambda: store.file(ident or ""),
                 "batch_create": lambda: store.create_batch(document),
                 "batch_get": lambda: store.retrieve_batch(ident or ""),
                 "batch_cancel": lambda: store.cancel_batch(ident or ""),
                 "response_get": lambda: store.response(ident or ""),
                 "response_delete": lambda: store.delete_response(ident or "")}
        return calls[kind](), _JSON

    def _answer_line(self, url: str, document: Any, number: int) -> tuple[int, Any]:
        """A batch line's answer, as the live route gives it (no limits, no faults)."""
        kind = _route(url)[0]["POST"]  # the store checked url is a batch endpoint
        try:
            plan = _plan(kind, document, self._token_ratio)
        except responses.BadRequest as exc:
            return 400, json.loads(responses.error_body(str(exc), "invalid_request_error",
                                                        param=exc.param))
        created = int(self.clock.time())
        if kind == "chat":
            body = responses.chat_body(plan, number, created)
        elif kind == "embeddings":
            body = responses.embeddings_body(plan)
        else:
            body = routes.answer(plan, number, created, self._origin())[0]
        return 200, json.loads(body)

    def _check_auth(self, handler: _Handler) -> Optional[str]:
        """Why the request is unauthorised, or ``None``. Never repeats the key it was given."""
        given = handler.headers.get("Authorization")
        if not given:
            return ("You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth (Authorization: Bearer YOUR_KEY).")
        if not hmac.compare_digest(given.strip().encode(), self._expected_auth):
            return "Incorrect API key provided."
        return None

    # -- refusals and faults ------------------------------------------------------------------

    def _refused(self, handler: _Handler, call: _Call, admission: Admission) -> Outcome:
        self._counters.rate_limited(admission.kind)
        hint = admission.hint_s
        again = "later" if hint is None else f"in {go_duration(hint)}"
        type_ = "tokens" if admission.kind == "tokens" else "requests"
        code = "rate_limit_exceeded"
        if admission.kind == "in_flight" and self._in_flight_litellm:
            # LiteLLM's parallel-request limiter; clients tell a concurrency cap by this text.
            message = (f"Max parallel request limit reached. Hit limit for model {call.model}. "
                       f"rate_limit_type: max_parallel_requests, "
                       f"limit: {self._max_in_flight}, current: {self._max_in_flight}.")
            type_, code = "rate_limit_error", "429"
        elif admission.kind == "in_flight":
            message = f"Too many concurrent requests for model {call.model}."
        elif self._overload_new_api and not admission.windowed:
            message = "upstream saturated, please try again later"
            type_, code = "new_api_error", "insufficient_quota"
        elif admission.windowed:
            message = (f"Rate limit reached for {type_} on model {call.model} in the sandbox's "
                       f"fixed window. Please try again {again}.")
        else:
            message = (f"Rate limit reached for {admission.kind} on model {call.model} in the "
                       f"sandbox. Please try again {again}.")
        return self._too_many(handler, call, type_, hint, admission.headers, message, code)

    def _too_many(self, handler: _Handler, call: _Call, type_: str, wait_s: Optional[float],
                  headers: tuple, message: str, code: str = "rate_limit_exceeded") -> Outcome:
        """A 429 with the configured retry hint for ``wait_s`` (``None``: no hint at all).

        The ``reset`` style puts the hint in the reset header of the limit that refused,
        replacing the true time left that header would otherwise carry.
        """
        hint: tuple = ()
        style = self.retry_after
        if wait_s is None:
            pass
        elif style == "seconds":
            hint = (("Retry-After", str(max(1, math.ceil(wait_s)))),)
        elif style == "ms":
            hint = (("retry-after-ms", str(max(1, math.ceil(wait_s * 1000)))),)
        elif style == "date":
            when = math.ceil(self.clock.time() + max(wait_s, 1.0))
            hint = (("Retry-After", email.utils.formatdate(when, usegmt=True)),)
        elif style == "reset":
            name = "x-ratelimit-reset-tokens" if type_ == "tokens" else "x-ratelimit-reset-requests"
            headers = tuple(h for h in headers if h[0] != name)
            hint = ((name, go_duration(wait_s)),)
        body = responses.error_body(message, type_, code)
        return self._send(handler, 429, call, body, headers + hint)

    def _inject(self, handler: _Handler, call: _Call, fault: str, plan: Any) -> Outcome:
        streaming = getattr(plan, "stream", False)
        if fault == "reset":
            self._finish(call, "reset")
            _reset(handler)
            return "reset"
        if fault == "quota":
            return self._send(handler, 429, call, responses.QUOTA_BODY)
        if fault == "html502":
            return self._send(handler, 502, call, responses.HTML_502_BODY,
                              content_type="text/html")
        if fault == "invalid_json":
            if streaming:
                return self._send_events(handler, call, [responses.INVALID_JSON_EVENT,
                                                         responses.DONE_EVENT])
            return self._send(handler, 200, call, responses.INVALID_JSON_BODY)
        if fault == "truncated":
            handler.close_connection = True
            if streaming:
                events = _stream_events(plan, call.number, int(self.clock.time()))
                return self._send_events(handler, call, events[:1], outcome="truncated")
            body = (responses.chat_body(plan, call.number, int(self.clock.time()))
                    if isinstance(plan, responses.ChatPlan) else responses.INVALID_JSON_BODY)
            return self._send(handler, 200, call, body[: len(body) // 2], length=len(body),
                              outcome="truncated")
        status = int(fault)
        return self._send(handler, status, call, responses.SERVER_ERROR_BODIES[status])

    def _error(self, handler: _Handler, call: _Call, status: int, message: str, type_: str,
               code: Optional[str] = None, param: Optional[str] = None) -> Outcome:
        return self._send(handler, status, call, responses.error_body(message, type_, code, param))

    # -- writing ------------------------------------------------------------------------------

    def _head(self, handler: _Handler, status: int, call: _Call, headers: tuple,
              content_type: str, length: Optional[int]) -> str:
        framing = ("Transfer-Encoding: chunked\r\n" if length is None
                   else f"Content-Length: {length}\r\n")
        parts = [_STATUS_LINES[status], _date_header(), "Content-Type: ", content_type, "\r\n",
                 framing, "x-request-id: ", call.request_id, "\r\n"]
        for name, value in headers:
            parts += (name, ": ", value, "\r\n")
        if handler.close_connection:
            parts.append("Connection: close\r\n")
        parts.append("\r\n")
        return "".join(parts)

    def _send(self, handler: _Handler, status: int, call: _Call, body: bytes,
              headers: tuple = (), content_type: str = _JSON, length: Optional[int] = None,
              outcome: Optional[Outcome] = None) -> Outcome:
        """Write the answer in one piece: two small writes would stall on delayed ACKs.

        ``length`` overrides the Content-Length (the ``truncated`` fault lies with it).
        """
        outcome = status if outcome is None else outcome
        head = self._head(handler, status, call, headers, content_type,
                          len(body) if length is None else length)
        self._finish(call, outcome)
        handler.wfile.write(head.encode("latin-1") + body)
        return outcome

    def _send_events(self, handler: _Handler, call: _Call, events: list, headers: tuple = (),
                     outcome: Outcome = 200) -> Outcome:
        """Server-sent events over chunked encoding, which keeps the connection reusable.

        A ``truncated`` outcome leaves the stream without its closing chunk.
        """
        head = self._head(handler, 200, call, headers + (("Cache-Control", "no-cache"),),
                          "text/event-stream; charset=utf-8", None)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)
        end = b"" if outcome == "truncated" else b"0\r\n\r\n"
        self._finish(call, outcome)
        handler.wfile.write(head.encode("latin-1") + chunks + end)
        return outcome

    # -- control endpoints (not counted) --------------------------------------------------------

    def _control(self, handler: _Handler, path: str) -> None:
        """``GET /_sandbox/stats``, ``POST /_sandbox/reset``: for a sandbox in another process."""
        _read_body(handler)
        call = _Call(0)
        call.request_id = "req_sandbox_control"
        call.finished = True  # not an API attempt: not counted
        if handler.command == "GET" and path.startswith("/_sandbox/images/"):
            self._send(handler, 200, call, routes.PNG_BYTES, content_type="image/png")
        elif (handler.command, path) == ("GET", "/_sandbox/stats"):
            self._send(handler, 200, call, json.dumps(self.stats()).encode())
        elif (handler.command, path) == ("POST", "/_sandbox/reset"):
            self.reset_stats()
            self._send(handler, 200, call, b'{"ok":true}')
        else:
            self._send(handler, 404, call, responses.error_body(
                f"Invalid URL ({handler.command} {path})", "invalid_request_error",
                "unknown_url"))


def _route(path: str) -> tuple[Optional[dict], Optional[str]]:
    """``({method: kind}, the id in the path)`` of a route, or ``(None, None)``."""
    methods = _ROUTES.get(path)
    if methods is not None:
        return methods, None
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return _ROUTES["/v1/models/{id}"], urllib.parse.unquote(path[len("/v1/models/"):])
    parts = path.split("/")  # "", "v1", resource, id[, action]
    if len(parts) not in (4, 5) or not parts[3]:
        return None, None
    methods = _ROUTES.get("/".join(parts[:3] + ["{id}"] + parts[4:]))
    return (methods, urllib.parse.unquote(parts[3])) if methods else (None, None)


def _plan(kind: str, document: Any, token_ratio: float) -> Any:
    """The plan of a request of a planned kind (:class:`~.responses.ChatPlan` & co.)."""
    if kind == "chat":
        return responses.plan_chat(document, token_ratio)
    if kind == "embeddings":
        return responses.plan_embeddings(document, token_ratio)
    return routes.plan_route(kind, document, token_ratio)


def _stream_events(plan: Any, number: int, created: int) -> list:
    """The events of a streamed answer, in its route's format."""
    if isinstance(plan, responses.ChatPlan):
        return responses.chat_stream_events(plan, number, created)
    return routes.stream_events(plan, number, created)


def _reset(handler: _Handler) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing proxy would."""
    handler.close_connection = True
    try:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    handler.connection.close()


def _read_body(handler: _Handler) -> Optional[bytes]:
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cometkit-sandbox"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.sandbox._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sandbox._closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _dispatch(self) -> None:
        self.server.sandbox._serve(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    #: Benchmarks open many connections at once; the default backlog of 5 drops SYNs.
    request_queue_size = 1024

    def __init__(self, address: tuple, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients vanish mid-answer and stop() cuts connections: not worth a traceback.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


def _check_number(name: str, value: Any, *, integer: bool = False, zero: bool = False,
                  optional: bool = True) -> None:
    """Refuse anything but a finite positive number (or ``None`` when ``optional``; 0 when
    ``zero``) with a ``ValueError`` naming the argument, never a ``TypeError`` from comparing."""
    if value is None and optional:
        return
    if (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
            or not (0 <= value if zero else 0 < value) or not value < math.inf):
        kind = "an integer" if integer else "a finite number"
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be {kind} {bound}, not {value!r}")


def _check_limit_shapes(arguments: dict) -> None:
    """Refuse bad or contradictory limit-shape arguments of :class:`Sandbox`, by name.

    :raises ValueError: naming the argument.
    """
    def one_of(name: str, choices: tuple) -> None:
        if arguments[name] not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, "
                             f"not {arguments[name]!r}")

    _check_number("window_requests", arguments["window_requests"], integer=True)
    for name in ("window_s", "token_window_s", "in_flight_retry_after_s"):
        _check_number(name, arguments[name])
    _check_number("token_ratio", arguments["token_ratio"], optional=False)
    for name, choices in (("window_align", WINDOW_ALIGNS),
                          ("window_retry_after", WINDOW_RETRY_AFTERS),
                          ("ratelimit_headers", HEADER_FAMILIES),
                          ("in_flight_style", IN_FLIGHT_STYLES),
                          ("overload_style", OVERLOAD_STYLES)):
        one_of(name, choices)
    windows = arguments["window_requests"] is not None or arguments["token_window_s"] is not None
    if arguments["window_requests"] is not None and (arguments["rpm"] is not None
                                                     or arguments["rps"] is not None):
        raise ValueError("give window_requests or rpm/rps, not both")
    if arguments["window_s"] is not None and arguments["window_requests"] is None:
        raise ValueError("window_s needs window_requests")
    if arguments["token_window_s"] is not None and arguments["tpm"] is None:
        raise ValueError("token_window_s needs tpm")
    for name, default in (("window_align", "first_request"), ("window_retry_after", "left")):
        if arguments[name] != default and not windows:
            raise ValueError(f"{name} needs window_requests or token_window_s")
    for name, default in (("in_flight_style", "openai"), ("in_flight_retry_after_s", None)):
        if arguments[name] != default and arguments["max_in_flight"] is None:
            raise ValueError(f"{name} needs max_in_flight")
    if arguments["overload_style"] != "openai" and not (
            arguments["rpm"] or arguments["rps"]
            or (arguments["tpm"] and arguments["token_window_s"] is None)):
        raise ValueError("overload_style needs a bucket limit: rpm, rps or tpm")
