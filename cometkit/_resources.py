"""OpenAI-shaped resources: ``client.chat.completions``, ``client.embeddings``, ``client.models``.

They only shape the request; every one goes through ``Client._call`` and so through the same
limiter, retry policy and metrics as ``client.request``. Each method takes the openai SDK's
request options (``extra_headers``, ``extra_query``, ``extra_body``, ``timeout``) and refuses
a keyword the openai API does not define, as the SDK does. ``<resource>.with_raw_response``
is the same resource answering with a :class:`~cometkit.RawResponse`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Union
from urllib.parse import quote

from ._call_options import checked_headers, checked_query, request_body

if TYPE_CHECKING:  # pragma: no cover
    from ._client import Client

__all__ = ["Chat", "Completions", "Embeddings", "Models", "CHAT_PARAMS", "EMBEDDING_PARAMS"]

#: Seconds, a ``(connect, read)`` pair, or an object with ``.connect``/``.read`` (an
#: ``httpx.Timeout``); ``None``: the client's.
Timeout = Union[float, "tuple[float, float]", Any, None]
#: Seconds (or a duration such as ``"20s"``) the whole call may take; ``None``: the client's.
Deadline = Union[float, str, None]
#: The call's priority lane (one of the client's ``priorities``); ``None``: the client's.
Priority = Optional[str]

#: The optional body fields of ``chat.completions.create`` (the openai SDK's keywords).
CHAT_PARAMS = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "moderation", "n",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
    "prompt_cache_options", "prompt_cache_retention", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream_options",
    "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
    "web_search_options",
})
#: The optional body fields of ``embeddings.create``.
EMBEDDING_PARAMS = frozenset({"dimensions", "encoding_format", "user"})


def path_id(name: str, value: Any, *, safe: str = "") -> str:
    """``value`` as one segment of a route (percent-encoded, ``safe`` characters kept), or
    a ``ValueError`` naming ``name``: an empty id would call another route."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"Expected a non-empty string for {name}, got {value!r}")
    return quote(value, safe=safe)


class _Resource:
    def __init__(self, client: Client, *, raw: bool = False) -> None:
        self._client = client
        self._raw = raw

    @property
    def with_raw_response(self) -> Any:
        """This resource, its methods answering with a :class:`~cometkit.RawResponse`
        (status, headers -- ``x-ratelimit-*`` -- and ``.parse()`` for the usual object)."""
        return type(self)(self._client, raw=True)

    def _send(self, method: str, route: str, body: Any = None, *, operation: str,
              model: Optional[str] = None, timeout: Timeout = None, deadline: Deadline = None,
              extra_headers: Optional[Mapping[str, str]] = None,
              extra_query: Optional[Mapping[str, Any]] = None, stream: bool = False,
              priority: Priority = None, params: Optional[Mapping[str, Any]] = None,
              **options: Any) -> Any:
        """Every method's one way to ``Client._call``: the per-call options checked once
        (``extra_query`` over the method's own query ``params``), ``with_raw_response``
        honoured; ``options`` (an upload's ``files``/``data``, ``raw``, ``answer_type``)
        passed on."""
        query = {**(params or {}), **(checked_query("extra_query", extra_query) or {})}
        return self._client._call(method, route, body, operation=operation, model=model,
                                  stream=stream, params=query or None,
                                  headers=checked_headers("extra_headers", extra_headers) or None,
                                  timeout=timeout, deadline=deadline, priority=priority,
                                  raw_response=self._raw, **options)


class Completions(_Resource):
    def create(self, *, model: str, messages: list, stream: bool = False,
               timeout: Timeout = None, deadline: Deadline = None, priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None, **params: Any) -> Any:
        """``POST /chat/completions``. Returns an :class:`ApiObject`, or a :class:`Stream`
        of chunks when ``stream=True`` (the deadline then covers the call up to the stream's
        first bytes). ``params`` are the openai API's optional fields (:data:`CHAT_PARAMS`);
        ``extra_body`` is merged over the body."""
        body = request_body("chat.completions.create", {"model": model, "messages": messages},
                            params, CHAT_PARAMS, extra_body)
        if stream:
            body["stream"] = True
        return self._send("POST", "/chat/completions", body, operation="chat", model=model,
                          stream=stream, timeout=timeout, deadline=deadline, priority=priority,
                          extra_headers=extra_headers, extra_query=extra_query)


    def parse(self, *, model: str, messages: list, response_format: Any,
              **options: Any) -> Any:
        """``create()`` with ``response_format`` a pydantic model class, as the ``openai``
        SDK's ``parse()``: the model's schema is sent as a strict ``json_schema``, and each
        ``choices[i].message.parsed`` holds the answer validated into the model. ``options``
        are ``create()``'s (not ``stream``). Needs pydantic.

        :raises APIError: an answer does not fit the model."""
        from ._parsed import parse_choices, response_format_for

        if options.get("stream"):
            raise TypeError("parse() reads a whole answer: use create(stream=True) to stream")
        if self._raw:
            raise TypeError("with_raw_response.parse() is not supported: use "
                            "with_raw_response.create(response_format=...) and .parse()")
        completion = self.create(model=model, messages=messages,
                                 response_format=response_format_for(response_format),
                                 **options)
        return parse_choices(completion, response_format)


class Chat(_Resource):
    def __init__(self, client: Client, *, raw: bool = False) -> None:
        super().__init__(client, raw=raw)
        self.completions = Completions(client, raw=raw)


class Embeddings(_Resource):
    def create(self, *, model: str, input: Any, timeout: Timeout = None,
               deadline: Deadline = None, priority: Priority = None,
               extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None, **params: Any) -> Any:
        """``POST /embeddings``; ``params``: :data:`EMBEDDING_PARAMS`."""
        body = request_body("embeddings.create", {"model": model, "input": input}, params,
                            EMBEDDING_PARAMS, extra_body)
        return self._send("POST", "/embeddings", body, operation="embeddings", model=model,
                          timeout=timeout, deadline=deadline, priority=priority,
                          extra_headers=extra_headers, extra_query=extra_query)


class Models(_Resource):
    def list(self, *, timeout: Timeout = None, deadline: Deadline = None,
             priority: Priority = None, extra_headers: Optional[Mapping[str, str]] = None,
             extra_query: Optional[Mapping[str, Any]] = None) -> Any:
        """``GET /models``: a :class:`~cometkit.ListObject` of the models."""
        return self._send("GET", "/models", None, operation="models", model=None,
                          timeout=timeout, deadline=deadline, priority=priority,
                          extra_headers=extra_headers, extra_query=extra_query)

    def retrieve(self, model: str, *, timeout: Timeout = None, deadline: Deadline = None,
                 priority: Priority = None, extra_headers: Optional[Mapping[str, str]] = None,
                 extra_query: Optional[Mapping[str, Any]] = None) -> Any:
        """``GET /models/{model}``: one model; ``NotFoundError`` when there is none."""
        return self._send("GET", f"/models/{path_id('model', model, safe='/')}", None,
                          operation="models", model=None, timeout=timeout, deadline=deadline,
                          priority=priority, extra_headers=extra_headers,
                          extra_query=extra_query)
