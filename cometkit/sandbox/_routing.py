"""Which route a request names, and which module plans and answers it.

The sandbox's routes are a table ``path -> {method: kind}``; a kind's request is planned
(validated, its model and ``tpm`` charge decided) and answered by
:mod:`~cometkit.sandbox.responses` (chat, embeddings: the benchmarks' hot path) or
:mod:`~cometkit.sandbox.routes` (the rest of the surface). The live handler and the batch
runner both answer through :func:`plan` and :func:`answer`, so a batch line is answered
exactly as the live route would answer it.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Optional

from . import responses, routes
from ._json import JSON

__all__ = ["ROUTES", "PLANNED_JSON", "route", "plan", "answer", "stream_events"]

#: ``path -> {method: kind}`` of the routes the sandbox serves; ``{id}`` is one path segment.
ROUTES = {
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
PLANNED_JSON = ("chat", "embeddings") + tuple(k for k in routes.ROUTE_KINDS
                                              if k != "transcriptions")


def route(path: str) -> tuple[Optional[dict], Optional[str]]:
    """``({method: kind}, the id in the path)`` of a route, or ``(None, None)``."""
    methods = ROUTES.get(path)
    if methods is not None:
        return methods, None
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return ROUTES["/v1/models/{id}"], urllib.parse.unquote(path[len("/v1/models/"):])
    parts = path.split("/")  # "", "v1", resource, id[, action]
    if len(parts) not in (4, 5) or not parts[3]:
        return None, None
    methods = ROUTES.get("/".join(parts[:3] + ["{id}"] + parts[4:]))
    return (methods, urllib.parse.unquote(parts[3])) if methods else (None, None)


def plan(kind: str, document: Any, token_ratio: float) -> Any:
    """The plan of a request of a planned kind (:class:`~.responses.ChatPlan` & co.).

    :raises ~cometkit.sandbox.responses.BadRequest: when the API would answer 400.
    """
    if kind == "chat":
        return responses.plan_chat(document, token_ratio)
    if kind == "embeddings":
        return responses.plan_embeddings(document, token_ratio)
    return routes.plan_route(kind, document, token_ratio)


def answer(planned: Any, number: int, created: int, origin: str) -> tuple[bytes, str]:
    """``(body, content type)`` of the whole answer to a plan; ``number`` makes ids unique,
    ``origin`` (``http://host:port``) is where image URLs point."""
    if isinstance(planned, responses.ChatPlan):
        return responses.chat_body(planned, number, created), JSON
    if isinstance(planned, responses.EmbeddingPlan):
        return responses.embeddings_body(planned), JSON
    return routes.answer(planned, number, created, origin)


def stream_events(planned: Any, number: int, created: int) -> list:
    """The events of a streamed answer, in its route's format."""
    if isinstance(planned, responses.ChatPlan):
        return responses.chat_stream_events(planned, number, created)
    return routes.stream_events(planned, number, created)
