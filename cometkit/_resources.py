"""OpenAI-shaped resources: ``client.chat.completions``, ``client.embeddings``, ``client.models``.

They only shape the request; every one goes through ``Client._call`` and so through the same
limiter, retry policy and metrics as ``client.request``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union
from urllib.parse import quote

if TYPE_CHECKING:  # pragma: no cover
    from ._client import Client

__all__ = ["Chat", "Completions", "Embeddings", "Models"]

Timeout = Union[float, "tuple[float, float]", None]
#: Seconds (or a duration such as ``"20s"``) the whole call may take; ``None``: the client's.
Deadline = Union[float, str, None]


def path_id(name: str, value: Any, *, safe: str = "") -> str:
    """``value`` as one segment of a route (percent-encoded, ``safe`` characters kept), or
    a ``ValueError`` naming ``name``: an empty id would call another route."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"Expected a non-empty string for {name}, got {value!r}")
    return quote(value, safe=safe)


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client


class Completions(_Resource):
    def create(self, *, model: str, messages: list, stream: bool = False,
               timeout: Timeout = None, deadline: Deadline = None,
               extra_headers: Optional[dict] = None, **params: Any) -> Any:
        """``POST /chat/completions``. Returns an :class:`ApiObject`, or a :class:`Stream`
        of chunks when ``stream=True`` (the deadline then covers the call up to the stream's
        first bytes)."""
        body = {"model": model, "messages": messages, **params}
        if stream:
            body["stream"] = True
        return self._client._call("POST", "/chat/completions", body, operation="chat",
                                  model=model, stream=stream, timeout=timeout,
                                  deadline=deadline, headers=extra_headers)


class Chat(_Resource):
    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.completions = Completions(client)


class Embeddings(_Resource):
    def create(self, *, model: str, input: Any, timeout: Timeout = None,
               deadline: Deadline = None, extra_headers: Optional[dict] = None,
               **params: Any) -> Any:
        """``POST /embeddings``."""
        body = {"model": model, "input": input, **params}
        return self._client._call("POST", "/embeddings", body, operation="embeddings",
                                  model=model, timeout=timeout, deadline=deadline,
                                  headers=extra_headers)


class Models(_Resource):
    def list(self, *, timeout: Timeout = None, deadline: Deadline = None) -> Any:
        """``GET /models``: the answer's ``.data`` lists the models."""
        return self._client._call("GET", "/models", None, operation="models", model=None,
                                  timeout=timeout, deadline=deadline)

    def retrieve(self, model: str, *, timeout: Timeout = None,
                 deadline: Deadline = None) -> Any:
        """``GET /models/{model}``: one model (``.id``, ``.owned_by``)."""
        return self._client._call("GET", f"/models/{path_id('model', model, safe='/')}", None,
                                  operation="models", model=None, timeout=timeout,
                                  deadline=deadline)
