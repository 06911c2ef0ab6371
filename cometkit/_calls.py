"""The life of one call of a :class:`~cometkit.Client`, from its arguments to its answer.

:class:`CallPath` is the part of ``Client`` that sends: it checks a call's own options,
encodes its body once (so every attempt sends the same bytes), hands the engine the attempt
function (send through the transport, read a stream up to its first event), and turns what
the last attempt got into what the caller receives: an object, a page, a stream, bytes or a
raw response; and it builds the :class:`~cometkit.RequestInfo` every front's call starts
from. ``Client`` inherits it, so a call costs no extra layer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

import requests

from ._answers import send_attempt
from ._binary import BinaryAnswer
from ._call_names import new_request_id, operation_for
from ._call_options import checked_headers
from ._client_args import call_deadline, call_timeout, check_mapping
from ._engine import CallEngine, Sent, cut_timeout
from ._exceptions import APIError
from ._multipart import encode_upload
from ._objects import ApiObject, json_default, wrap_answer
from ._raw_response import RawResponse
from ._sse import completion_as_chunk, event_error, fail_attempt, read_first_event
from ._streaming import Stream, nothing_to_finish
from ._transport import Transport
from .clock import Clock
from .plugin_api import AttemptResult, RequestInfo
from .priorities import Priorities

__all__ = ["CallPath", "UNSET"]


def _raw_content(content: bytes, _response: Any) -> bytes:
    """The decoder of a raw answer: its bytes as they are."""
    return content


class _Unset:
    """The type of :data:`UNSET`: "not given", where ``None`` means something."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


class CallPath:
    """The sending half of :class:`~cometkit.Client`, a base class of it: :meth:`request`
    (any route), :meth:`new_request` (a call's :class:`RequestInfo`, for every front) and
    ``_call``, which every resource method ends in. Its attributes are set by ``Client``."""

    _transport: Transport
    _engine: CallEngine
    _clock: Clock
    timeout_s: tuple[float, float]
    deadline_s: Optional[float]
    priorities: Priorities
    _max_attempts: Optional[int]
    _default_headers: dict[str, str]
    _default_query: dict[str, Any]

    if TYPE_CHECKING:  # pragma: no cover -- defined by Client
        def _check_open(self) -> None: ...

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        params: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        stream: bool = False,
        timeout: Union[float, tuple[float, float], None] = None,
        operation: Optional[str] = None,
        deadline: Union[float, str, None] = None,
        priority: Optional[str] = None,
        files: Optional[Mapping[str, Any]] = None,
        data: Optional[Mapping[str, Any]] = None,
        raw: bool = False,
    ) -> Any:
        """Call any route below ``base_url`` through the limiter, retries and metrics.

        :param deadline: seconds the whole call may take (admission, attempts, retry waits);
            ``None``: the client's ``deadline``. Past it: ``APITimeoutError``.
        :param priority: the call's lane, one of the client's ``priorities`` (``None``: the
            client's ``priority``); the limiter admits a waiting call of a higher lane first.
            An unknown name raises :class:`ConfigError` (a ``ValueError``).
        :param files: an upload (``multipart/form-data``) instead of a JSON body: field
            name -> bytes, a binary file, a path or ``(filename, content[, content_type])``;
            encoded once, so a retry sends the same bytes.
        :param data: the form fields sent with ``files``.
        :param raw: return the answer's bytes as a :class:`BinaryAnswer` (speech, a file's
            content) instead of decoding JSON.
        :param operation: the operation name in the metrics (default: the route's, see
            ``docs/metrics.md``).

        :returns: an :class:`ApiObject` for a JSON object answer (a :class:`ListObject`
            for a list answer, paged with ``after`` when it says ``has_more``), a list for a
            JSON array, a :class:`Stream` when ``stream`` is true, a :class:`BinaryAnswer`
            when ``raw`` is true, or ``None`` for an empty body.
        """
        if not isinstance(method, str):
            raise TypeError(f"method must be a string such as \"POST\", got "
                            f"{type(method).__name__}")
        if not method.strip() or not method.isalpha():
            raise ValueError(f"method must be an HTTP method such as \"POST\", got {method!r}")
        if not isinstance(path, str):
            raise TypeError(f"path must be a string such as \"/chat/completions\", got "
                            f"{type(path).__name__}")
        check_mapping("params", params)
        headers = checked_headers("headers", headers) or None
        if not path.startswith("/"):
            path = "/" + path
        if files is not None and json is not None:
            raise TypeError("give json= (a JSON body) or files= (an upload), not both")
        method = method.upper()
        fields = data if files is not None else json
        model = fields.get("model") if isinstance(fields, Mapping) else None
        return self._call(method, path, json, params=params, headers=headers, stream=stream,
                          timeout=timeout, operation=operation or operation_for(path),
                          model=model, deadline=deadline, priority=priority, files=files, data=data,
                          raw=raw)

    def new_request(self, method: str, route: str, body: Any = None, *, stream: bool = False,
                    operation: Optional[str] = None, model: Optional[str] = None,
                    deadline_s: Union[float, None, _Unset] = UNSET,
                    priority: Optional[str] = None) -> RequestInfo:
        """The :class:`RequestInfo` of one call of this client, whichever front sends it: a new
        id, the operation named after ``route`` (unless given), the model from ``body`` (unless
        given), the start time, the client's ``deadline`` (unless ``deadline_s`` is given) and
        ``max_retries``, and its priority lane (``priority``, else the client's).

        :raises ConfigError: ``priority`` is no configured lane.
        """
        if model is None and isinstance(body, Mapping):
            model = body.get("model") if isinstance(body.get("model"), str) else None
        lane, rank = self.priorities.resolve(priority)
        return RequestInfo(new_request_id(), operation or operation_for(route), method, route,
                           model, stream, body, self._clock.monotonic(),
                           self.deadline_s if deadline_s is UNSET else deadline_s,
                           max_attempts=self._max_attempts, priority=lane,
                           priority_rank=rank)

    def _call(
        self,
        method: str,
        route: str,
        body: Any,
        *,
        operation: str,
        model: Optional[str],
        params: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        stream: bool = False,
        timeout: Any = None,
        deadline: Union[float, str, None] = None,
        raw_response: bool = False,
        priority: Optional[str] = None,
        files: Optional[Mapping[str, Any]] = None,
        data: Optional[Mapping[str, Any]] = None,
        raw: bool = False,
        answer_type: Callable[[dict, Optional[str]], Any] = ApiObject,
    ) -> Any:
        """One call to its end. ``raw_response``: answer with a :class:`RawResponse`;
        ``files``/``data``: an upload instead of the JSON ``body``; ``raw``: the answer as a
        :class:`BinaryAnswer`; ``answer_type``: what wraps a JSON object answer (a route's own
        :class:`ApiObject` subclass)."""
        self._check_open()
        # checked here, for request() and every resource
        timeout_s = call_timeout(timeout, self.timeout_s)
        deadline_s = call_deadline(deadline, self.deadline_s)
        if raw and stream:
            raise ValueError("raw=True reads the whole answer; stream=True is for event "
                             "streams: give one of them")
        if self._default_headers:
            headers = {**self._default_headers, **(headers or {})}
        if self._default_query:
            params = {**self._default_query, **(params or {})}
        if files is not None:
            payload, content_type = encode_upload(files, data)
            headers = {**(headers or {}), "Content-Type": content_type}
            body = dict(data or {})  # what the limiter and the sinks may read of the request
        elif data is not None:
            raise TypeError("data= holds the form fields of an upload: give files= with it, "
                            "or send a JSON body with json=")
        else:
            payload = None if body is None else json.dumps(body, separators=(",", ":"),
                                                           default=json_default).encode()
        request = self.new_request(method, route, body, stream=stream, operation=operation,
                                   model=model, deadline_s=deadline_s, priority=priority)
        send = self._transport.send
        secrets = self._transport.secrets  # answers come through it already blanked

        def attempt(result: AttemptResult) -> Sent:
            sent = send_attempt(
                result, lambda: send(method, route, payload, params=params, headers=headers,
                                     stream=stream,
                                     timeout_s=cut_timeout(timeout_s, result.time_left_s)),
                stream=stream, method=method, route=route, secrets=secrets,
                follows_redirects=False,  # the transport follows none
                decode=_raw_content if raw else self._decode)
            if stream and result.error is None and not sent.streaming:
                # a whole JSON answer to a stream request: an error, or the lot
                sent.response.close()
                value = sent.value
                failure = event_error(value, sent.provider_request_id)
                if failure is None and not isinstance(value, dict):
                    what = "an empty body" if value is None else \
                        f"a JSON {type(value).__name__}"
                    failure = APIError(
                        f"the server answered a stream request with {what} instead of "
                        "events or an object: check base_url",
                        request_id=sent.provider_request_id, body=value)
                if failure is not None:
                    fail_attempt(result, failure)
            elif sent.streaming:  # an event stream: its first event is part of the attempt
                sent.events, failure = read_first_event(sent.response, secrets,
                                                        sent.provider_request_id)
                if failure is not None:
                    sent.response.close()
                    sent.streaming = False
                    fail_attempt(result, failure)
            return sent

        sent, result, error, permit = self._engine.execute(request, attempt)
        if error is not None:
            raise error
        answer = self._answer(sent, result, permit, stream=stream, secrets=secrets,
                              method=method, route=route, body=body, operation=operation,
                              model=model, params=params, headers=headers, timeout=timeout,
                              deadline=deadline, raw=raw, answer_type=answer_type)
        if not raw_response:
            return answer
        return RawResponse(status_code=sent.response.status_code,
                           headers=sent.response.headers,
                           content=None if sent.streaming else sent.response.content,
                           parsed=answer, request_id=sent.provider_request_id,
                           retries_taken=result.attempt - 1)

    def _answer(self, sent: Sent, result: AttemptResult, permit: Any, *, stream: bool,
                secrets: Any, method: str, route: str, body: Any, operation: str,
                model: Optional[str], params: Optional[Mapping[str, Any]],
                headers: Optional[Mapping[str, str]], timeout: Any,
                deadline: Union[float, str, None], raw: bool = False,
                answer_type: Callable[[dict, Optional[str]], Any] = ApiObject) -> Any:
        """What a successful call returns: a :class:`Stream`, a :class:`BinaryAnswer`
        (``raw``), or the decoded answer (a list answer that says ``has_more`` fetches its
        next page with the same options)."""
        if sent.streaming:
            return Stream(sent.response, self._engine.end_of_stream(sent, result, permit),
                          monotonic=self._clock.monotonic, started_at=result.started_at,
                          request_id=sent.provider_request_id, secrets=secrets,
                          defer=self._engine.defer, preloaded=sent.events)
        if stream:  # answered whole (already recorded): the completion as one chunk
            return Stream(sent.response, nothing_to_finish, monotonic=self._clock.monotonic,
                          started_at=result.started_at, request_id=sent.provider_request_id,
                          preloaded=[completion_as_chunk(sent.value)], defer=self._engine.defer)
        if raw:
            return BinaryAnswer(sent.value, status_code=sent.response.status_code,
                                headers=sent.response.headers,
                                request_id=sent.provider_request_id)
        next_page = None
        if method == "GET" and isinstance(sent.value, dict) and sent.value.get("has_more"):
            def next_page(after: str) -> Any:
                return self._call(method, route, body, operation=operation, model=model,
                                  params={**(params or {}), "after": after}, headers=headers,
                                  timeout=timeout, deadline=deadline)
        return wrap_answer(sent.value, sent.provider_request_id, next_page, answer_type)

    @staticmethod
    def _decode(content: bytes, response: requests.Response) -> Any:
        if not content:
            return None
        try:
            return json.loads(content)
        except ValueError as exc:
            raise APIError(
                f"the server answered {response.status_code} with a body that is not JSON "
                f"({content[:80]!r}...): check base_url",
                request_id=response.headers.get("x-request-id"),
                body=content.decode("utf-8", "replace")[:1000],
            ) from exc
