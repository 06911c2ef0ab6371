"""OpenAI-shaped resources: ``client.chat.completions``, ``client.embeddings``, ``client.models``.

They only shape the request; every one goes through ``Client._call`` and so through the same
limiter, retry policy and metrics as ``client.request``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from ._client import Client

__all__ = ["Chat", "Completions", "Embeddings", "Models"]

Timeout = Union[float, "tuple[float, float]", None]
#: Seconds (or a duration such as ``"20s"``) the whole call may take; ``None``: the client's.
Deadline = Union[float, str, None]
#: The call's priority lane (one of the client's ``priorities``); ``None``: the client's.
Priority = Optional[str]


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client


class Completions(_Resource):
    def create(self, *, model: str, messages: list, stream: bool = False,
               timeout: Timeout = None, deadline: Deadline = None, priority: Priority = None,
               extra_headers: Optional[dict] = None, **params: Any) -> Any:
        """``POST /chat/completions``. Returns an :class:`ApiObject`, or a :class:`Stream`
        of chunks when ``stream=True`` (the deadline then covers the call up to the stream's
        first bytes)."""
        body = {"model": model, "messages": messages, **params}
        if stream:
            body["stream"] = True
        return self._client._call("POST", "/chat/completions", body, operation="chat",
                                  model=model, stream=stream, timeout=timeout,
                                  deadline=deadline, priority=priority,
                                  headers=extra_headers)


class Chat(_Resource):
    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.completions = Completions(client)


class Embeddings(_Resource):
    def create(self, *, model: str, input: Any, timeout: Timeout = None,
               deadline: Deadline = None, priority: Priority = None,
               extra_headers: Optional[dict] = None, **params: Any) -> Any:
        """``POST /embeddings``."""
        body = {"model": model, "input": input, **params}
        return self._client._call("POST", "/embeddings", body, operation="embeddings",
                                  model=model, timeout=timeout, deadline=deadline,
                                  priority=priority, headers=extra_headers)


class Models(_Resource):
    def list(self, *, timeout: Timeout = None, deadline: Deadline = None,
             priority: Priority = None) -> Any:
        """``GET /models``: the answer's ``.data`` lists the models."""
        return self._client._call("GET", "/models", None, operation="models", model=None,
                                  timeout=timeout, deadline=deadline, priority=priority)
