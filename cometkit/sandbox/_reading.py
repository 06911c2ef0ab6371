"""Reading a request body, as every planner of the sandbox does.

The 400 a planner raises (:class:`BadRequest`), the fields every API reads the same way (the
model, a positive integer, the text of a message's content, an ``input``), and the sandbox's
token count (chars/4, scaled by its ``token_ratio``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["BadRequest", "estimate_tokens", "scale_tokens", "content_text", "positive_int",
           "required_model", "input_texts", "streaming"]


class BadRequest(ValueError):
    """A request the API refuses with 400; the message is what the client is told."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


def estimate_tokens(chars: int) -> int:
    """Tokens for ``chars`` characters: a quarter, rounded up, at least one (roughly tiktoken)."""
    return max(1, -(-chars // 4))


def scale_tokens(tokens: int, ratio: float) -> int:
    """``tokens`` counted by a tokenizer that yields ``ratio`` times as many, rounded up, at
    least one: the sandbox's own tokenizer, which a client's estimate need not match."""
    if ratio == 1.0:
        return tokens
    return max(1, math.ceil(tokens * ratio - 1e-9))


def content_text(content: Any) -> str:
    """The text of a message ``content``: a string, or the ``text`` of its content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"] for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def positive_int(body: dict, name: str) -> Optional[int]:
    """``body[name]``: a positive integer, or ``None`` when absent."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"Invalid '{name}': expected a positive integer.", name)
    return value


def required_model(body: Any) -> str:
    """The ``model`` of a JSON-object body; without one the API answers 400."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", "model")
    return model


def input_texts(document: dict) -> list[str]:
    """The texts of an ``input`` that is a string or an array (of strings or content parts)."""
    raw = document.get("input")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise BadRequest("Invalid 'input': expected a string or a non-empty array.", "input")
    return [item if isinstance(item, str) else content_text([item]) for item in items]



def streaming(body: dict) -> tuple[bool, bool]:
    """``(stream, include_usage)``: whether the answer is streamed, and whether its stream
    ends with a usage chunk (``stream_options.include_usage``)."""
    stream = body.get("stream") is True
    options = body.get("stream_options")
    return stream, stream and isinstance(options, dict) and options.get("include_usage") is True
