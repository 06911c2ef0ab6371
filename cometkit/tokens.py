"""The token estimate of a request before it is sent, for everything that must decide ahead of
the answer: the limiter's token buckets and a batch's budget reserve the same number.

The answer's ``usage`` settles what was really spent; the estimate only has to be close enough
to be charged up front and corrected after.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

__all__ = ["CHARS_PER_TOKEN", "estimate_parts", "estimate_tokens"]

#: Characters per token in the pre-call estimate (OpenAI's rule of thumb for English).
CHARS_PER_TOKEN = 4


def _text_chars(value: Any) -> int:
    """Characters of prompt text in a message ``content``, ``input`` or ``prompt`` value."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):  # a token id (embeddings input may be token arrays)
        return CHARS_PER_TOKEN
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, Mapping):  # a content part {"type": "text", "text": ...}, or a
        # Responses API input item {"role": ..., "content": ...}
        return _text_chars(value.get("text")) + _text_chars(value.get("content"))
    if callable(getattr(value, "to_dict", None)):  # an answer's part, sent back as it came
        return _text_chars(value.to_dict())
    return 0


def estimate_parts(body: Optional[Mapping[str, Any]]) -> tuple[int, int]:
    """``(prompt tokens, reserved answer tokens)`` a request may cost, before it is sent.

    Prompt text is the ``content`` of every message (strings or text parts), ``input``
    (embeddings, moderations, responses: strings or input items), ``prompt`` (completions,
    images), ``instructions`` (responses) and ``system`` (Anthropic messages), at
    :data:`CHARS_PER_TOKEN`
    characters per token. ``max_tokens`` (or ``max_completion_tokens``, ``max_output_tokens``)
    is reserved for the answer, as providers reserve it; without it the answer is not reserved
    and the correction from ``usage`` after the call takes it out of the bucket instead.
    """
    if not isinstance(body, Mapping):
        return 0, 0
    chars = sum(_text_chars(body.get(key)) for key in ("input", "prompt", "instructions",
                                                        "system"))
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, Mapping) and callable(getattr(message, "to_dict", None)):
                message = message.to_dict()  # an answer's message put back (a tool loop)
            if isinstance(message, Mapping):
                chars += _text_chars(message.get("content"))
    answer = body.get("max_tokens", body.get("max_completion_tokens",
                                             body.get("max_output_tokens")))
    if isinstance(answer, bool) or not isinstance(answer, int) or answer < 0:
        answer = 0
    return math.ceil(chars / CHARS_PER_TOKEN), answer


def estimate_tokens(body: Optional[Mapping[str, Any]]) -> int:
    """Tokens a request may cost before it is sent: :func:`estimate_parts`, summed."""
    prompt, answer = estimate_parts(body)
    return prompt + answer
