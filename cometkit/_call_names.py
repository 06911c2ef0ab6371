"""What a call is called: its operation name in the metrics, and cometkit's own id for it.

Every front (the client's resources, ``request()``, :mod:`cometkit.httpx`, the ``requests``
adapter) names its calls with these, so a route reads the same in every sink whoever sent it.
"""

from __future__ import annotations

import itertools
import os
import random
import re

__all__ = ["operation_for", "new_request_id"]

_call_counter = itertools.count(1)
_ID_PREFIX = f"ck-{os.getpid():x}-{random.getrandbits(24):06x}-"


#: The operation name of each route, matched at the end of the path: OpenTelemetry GenAI
#: names (``gen_ai.operation.name``) where the conventions have one, clear names otherwise.
#: The first pattern that matches wins, so ``chat/completions`` comes before ``completions``.
_OPERATIONS = (
    (r"chat/completions", "chat"),
    (r"messages", "chat"),  # the Anthropic-format route CometAPI also serves
    (r"completions", "text_completion"),
    (r"embeddings", "embeddings"),
    (r"responses", "generate_content"),
    (r"responses/[^/]+(?:/[^/]+)?", "responses"),  # retrieve, delete, input_items, cancel
    (r"moderations", "moderations"),
    (r"images/(?:generations|edits|variations)", "images"),
    (r"audio/transcriptions", "audio.transcriptions"),
    (r"audio/translations", "audio.translations"),
    (r"audio/speech", "audio.speech"),
    (r"files(?:/[^/]+(?:/content)?)?", "files"),
    (r"batches(?:/[^/]+(?:/cancel)?)?", "batches"),
    (r"models(?:/[^/]+)?", "models"),
)
_OPERATION_NAMES = tuple(name for _, name in _OPERATIONS)
_OPERATION_PATTERN = re.compile(
    "|".join(f"(/{pattern}$)" for pattern, _ in _OPERATIONS))


def operation_for(path: str) -> str:
    """The operation name of a route (or a full URL path ending in one, such as
    ``/v1/files/file-1/content``); ``request`` for any other route."""
    path = path.split("?", 1)[0].rstrip("/")
    match = _OPERATION_PATTERN.search(path)
    return _OPERATION_NAMES[match.lastindex - 1] if match else "request"


def new_request_id() -> str:
    """cometkit's own id for a call, shared by its attempts (never the provider's)."""
    return f"{_ID_PREFIX}{next(_call_counter):x}"
