"""The sandbox's request handling: what one request is answered, and how it is counted.

:class:`RequestHandler` takes a request from :mod:`~cometkit.sandbox._http`, routes it
(:mod:`~cometkit.sandbox._routing`), reads and plans its body, checks the API key, applies
``always_429``, the rate limits and the injected faults, answers it (or lets the store answer
a files / batches / stored-responses route), and counts the attempt. The public
:class:`~cometkit.sandbox.Sandbox` builds one from its arguments and owns its lifecycle.
"""

from __future__ import annotations

import hmac
import itertools
import json
import random
import threading
import urllib.parse
from typing import Any, Callable, Optional, Sequence

from .._multipart import decode_upload
from ..clock import Clock
from . import _routing, responses, routes
from ._http import ConnectionHandler, head, read_body, reset_connection
from ._json import JSON, dumps
from ._refusals import ALWAYS_429_MESSAGE, Refusals
from .faults import FaultPlan
from .limits import Admission, RateLimits
from .stats import Counters, Outcome
from .store import Store, StoreError

__all__ = ["RequestHandler"]


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


class RequestHandler:
    """Answers the requests of one sandbox; thread-safe (one call per handler thread).

    :param origin: ``http://host:port`` of the running sandbox (image URLs point there).
    :param stopping: set when the sandbox stops: a request waiting out a latency is dropped.
    :param api_key: when set, requests must carry ``Authorization: Bearer <api_key>``.
    """

    def __init__(self, *, counters: Counters, limits: Optional[RateLimits], faults: FaultPlan,
                 refusals: Refusals, seed: Optional[int], clock: Clock,
                 origin: Callable[[], str], stopping: threading.Event,
                 api_key: Optional[str], latency_s: float, slow_s: float, always_429: bool,
                 retry_after_value_s: float, models: Sequence[str],
                 token_ratio: float) -> None:
        self._counters = counters
        self._limits = limits
        self._faults = faults
        self._refusals = refusals
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self._clock = clock
        self._origin = origin
        self._stopping = stopping
        self._expected_auth = f"Bearer {api_key}".encode() if api_key is not None else None
        self._latency_s = latency_s
        self._slow_s = slow_s
        self._always_429 = always_429
        self._retry_after_value_s = retry_after_value_s
        self._models = models
        self._token_ratio = token_ratio
        self._ids = itertools.count(1)
        self._store = Store(self._answer_line, clock.time)

    def serve(self, handler: ConnectionHandler) -> None:
        """Answer one request: an API attempt (counted) or a ``/_sandbox/`` control one."""
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

    def _answer(self, handler: ConnectionHandler, path: str, call: _Call) -> Outcome:
        body = read_body(handler)
        if body is None:
            handler.close_connection = True
            return self._error(handler, call, 400, "Could not read the request body.",
                               "invalid_request_error")
        methods, ident = _routing.route(path)
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
        if kind in _routing.PLANNED_JSON or kind == "batch_create":
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
        if kind in _routing.PLANNED_JSON or kind == "transcriptions":
            try:
                plan = _routing.plan(kind, document, self._token_ratio)
            except responses.BadRequest as exc:
                return self._error(handler, call, 400, str(exc), "invalid_request_error",
                                   param=exc.param)
            call.model = plan.model
            self._counters.model(plan.model)
        if self._always_429:
            self._counters.rate_limited("always")
            return self._send(handler, 429, call, *self._refusals.too_many(
                "requests", self._retry_after_value_s, (), ALWAYS_429_MESSAGE))
        admission: Optional[Admission] = None
        if plan is not None and self._limits is not None:
            admission = self._limits.admit(plan.model, plan.charge)
            if not admission.ok:
                self._counters.rate_limited(admission.kind)
                return self._send(handler, 429, call,
                                  *self._refusals.refused(admission, call.model))
            call.admitted = True
        return self._admitted(handler, call, kind, ident, plan, document,
                              admission.headers if admission is not None else ())

    def _admitted(self, handler: ConnectionHandler, call: _Call, kind: str,
                  ident: Optional[str], plan: Any, document: Any, headers: tuple) -> Outcome:
        fault = None
        if self._faults:
            with self._random_lock:
                fault = self._faults.pick(self._random.random())
        if fault is not None:
            self._counters.fault(fault)
        delay = self._latency_s + (self._slow_s if fault == "slow" else 0.0)
        if delay > 0 and self._stopping.wait(delay):
            raise _Aborted
        if fault is not None and fault != "slow":
            return self._inject(handler, call, fault, plan)
        created = int(self._clock.time())
        if getattr(plan, "stream", False):
            events = _routing.stream_events(plan, call.number, created)
            if kind == "responses":
                self._keep_response(plan, call.number, created)
            return self._send_events(handler, call, events, headers)
        content_type = JSON
        if kind == "models":
            body = responses.models_body(self._models, created)
        elif kind == "model":
            if ident not in self._models:
                return self._error(handler, call, 404, f"The model '{ident}' does not exist",
                                   "invalid_request_error", "model_not_found", "model")
            body = responses.model_body(ident, created)
        elif plan is not None:
            body, content_type = _routing.answer(plan, call.number, created, self._origin())
            if kind == "responses":
                self._keep_response(plan, call.number, created, body)
        else:
            try:
                body, content_type = self._stored(kind, ident, document, handler.path)
            except StoreError as exc:
                return self._error(handler, call, exc.status, str(exc),
                                   "invalid_request_error", exc.code, exc.param)
        return self._send(handler, 200, call, body, headers, content_type=content_type)

    def _keep_response(self, plan: Any, number: int, created: int,
                       body: Optional[bytes] = None) -> None:
        """Store a response for ``GET /v1/responses/{id}``, unless it asked ``store: false``."""
        if plan.document.get("store", True) is not False:
            if body is None:
                body = dumps(routes.response_object(plan, number, created))
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
                                      (query.get("limit") or [None])[0]), JSON
        calls = {"file_upload": lambda: store.upload(document),
                 "file_get": lambda: store.file(ident or ""),
                 "batch_create": lambda: store.create_batch(document),
                 "batch_get": lambda: store.retrieve_batch(ident or ""),
                 "batch_cancel": lambda: store.cancel_batch(ident or ""),
                 "response_get": lambda: store.response(ident or ""),
                 "response_delete": lambda: store.delete_response(ident or "")}
        return calls[kind](), JSON

    def _answer_line(self, url: str, document: Any, number: int) -> tuple[int, Any]:
        """A batch line's answer, as the live route gives it (no limits, no faults)."""
        kind = _routing.route(url)[0]["POST"]  # the store checked url is a batch endpoint
        try:
            plan = _routing.plan(kind, document, self._token_ratio)
        except responses.BadRequest as exc:
            return 400, json.loads(responses.error_body(str(exc), "invalid_request_error",
                                                        param=exc.param))
        body, _ = _routing.answer(plan, number, int(self._clock.time()), self._origin())
        return 200, json.loads(body)

    def _check_auth(self, handler: ConnectionHandler) -> Optional[str]:
        """Why the request is unauthorised, or ``None``. Never repeats the key it was given."""
        given = handler.headers.get("Authorization")
        if not given:
            return ("You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth (Authorization: Bearer YOUR_KEY).")
        if not hmac.compare_digest(given.strip().encode(), self._expected_auth):
            return "Incorrect API key provided."
        return None

    # -- faults and errors --------------------------------------------------------------------

    def _inject(self, handler: ConnectionHandler, call: _Call, fault: str, plan: Any) -> Outcome:
        streaming = getattr(plan, "stream", False)
        if fault == "reset":
            self._finish(call, "reset")
            reset_connection(handler)
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
                events = _routing.stream_events(plan, call.number, int(self._clock.time()))
                return self._send_events(handler, call, events[:1], outcome="truncated")
            body = (responses.chat_body(plan, call.number, int(self._clock.time()))
                    if isinstance(plan, responses.ChatPlan) else responses.INVALID_JSON_BODY)
            return self._send(handler, 200, call, body[: len(body) // 2], length=len(body),
                              outcome="truncated")
        status = int(fault)
        return self._send(handler, status, call, responses.SERVER_ERROR_BODIES[status])

    def _error(self, handler: ConnectionHandler, call: _Call, status: int, message: str,
               type_: str, code: Optional[str] = None, param: Optional[str] = None) -> Outcome:
        return self._send(handler, status, call, responses.error_body(message, type_, code, param))

    # -- writing ------------------------------------------------------------------------------

    def _send(self, handler: ConnectionHandler, status: int, call: _Call, body: bytes,
              headers: tuple = (), content_type: str = JSON, length: Optional[int] = None,
              outcome: Optional[Outcome] = None) -> Outcome:
        """Write the answer in one piece: two small writes would stall on delayed ACKs.

        ``length`` overrides the Content-Length (the ``truncated`` fault lies with it).
        """
        outcome = status if outcome is None else outcome
        text = head(status, call.request_id, headers, content_type,
                    len(body) if length is None else length, handler.close_connection)
        self._finish(call, outcome)
        handler.wfile.write(text.encode("latin-1") + body)
        return outcome

    def _send_events(self, handler: ConnectionHandler, call: _Call, events: list,
                     headers: tuple = (), outcome: Outcome = 200) -> Outcome:
        """Server-sent events over chunked encoding, which keeps the connection reusable.

        A ``truncated`` outcome leaves the stream without its closing chunk.
        """
        text = head(200, call.request_id, headers + (("Cache-Control", "no-cache"),),
                    "text/event-stream; charset=utf-8", None, handler.close_connection)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)
        end = b"" if outcome == "truncated" else b"0\r\n\r\n"
        self._finish(call, outcome)
        handler.wfile.write(text.encode("latin-1") + chunks + end)
        return outcome

    # -- control endpoints (not counted) --------------------------------------------------------

    def _control(self, handler: ConnectionHandler, path: str) -> None:
        """``GET /_sandbox/stats``, ``POST /_sandbox/reset``: for a sandbox in another process."""
        read_body(handler)
        call = _Call(0)
        call.request_id = "req_sandbox_control"
        call.finished = True  # not an API attempt: not counted
        if handler.command == "GET" and path.startswith("/_sandbox/images/"):
            self._send(handler, 200, call, routes.PNG_BYTES, content_type="image/png")
        elif (handler.command, path) == ("GET", "/_sandbox/stats"):
            self._send(handler, 200, call, json.dumps(self._counters.snapshot()).encode())
        elif (handler.command, path) == ("POST", "/_sandbox/reset"):
            self._counters.reset()
            self._send(handler, 200, call, b'{"ok":true}')
        else:
            self._send(handler, 404, call, responses.error_body(
                f"Invalid URL ({handler.command} {path})", "invalid_request_error",
                "unknown_url"))
