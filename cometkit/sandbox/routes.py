"""The rest of the OpenAI surface the sandbox serves (and Anthropic's ``/messages``): the
Responses API, legacy completions, moderations, images, speech and transcriptions.

Each request is planned before admission: validated (a 400 otherwise), and its model, the
tokens the ``tpm`` limit charges and the facts of its answer decided (:class:`RoutePlan`).
This module plans; :mod:`~cometkit.sandbox._route_answers` writes each API's answer from the
plan, whole or as server-sent events (its public names are exported here too). Like
:mod:`cometkit.sandbox.responses`, every answer is a function of the request alone (an echo,
a hash, the size of an upload), so runs repeat exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ._reading import (
    BadRequest,
    content_text,
    estimate_tokens,
    input_texts,
    positive_int,
    required_model,
    scale_tokens,
    streaming,
)
from ._route_answers import (
    MODERATION_CATEGORIES,
    PNG_BYTES,
    SPEECH_TYPES,
    answer,
    response_object,
    stream_events,
)

__all__ = ["ROUTE_KINDS", "RoutePlan", "plan_route", "answer", "stream_events", "PNG_BYTES",
           "MODERATION_CATEGORIES", "response_object"]

#: The routes planned here, by the kind the server names them with.
ROUTE_KINDS = ("responses", "completions", "messages", "moderations", "images", "speech",
               "transcriptions")
_TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


@dataclass(frozen=True)
class RoutePlan:
    """A request of one of :data:`ROUTE_KINDS` and the facts of its answer."""

    kind: str
    model: Optional[str]
    document: Any
    #: Tokens charged against ``tpm``: the prompt plus the answer's limit (or the answer).
    charge: int
    stream: bool = False
    reply: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False
    include_usage: bool = False


def _reply(prompt: str, limit: Optional[int]) -> tuple[str, int, bool]:
    """``("echo: " + prompt, its tokens, cut by the limit)``."""
    reply = "echo: " + prompt
    tokens = estimate_tokens(len(reply))
    if limit is not None and tokens > limit:
        return reply[: limit * 4], limit, True
    return reply, tokens, False


def _conversation(items: list, preamble: Any, param: str) -> tuple[int, str]:
    """``(characters of prompt, text of the last user turn)`` of Responses API input items
    or Anthropic messages, after the ``instructions`` or ``system`` text ``preamble``."""
    chars = len(content_text(preamble)) if preamble else 0
    last_user = ""
    for item in items:
        if not isinstance(item, dict):
            raise BadRequest(f"Invalid '{param}': items must be objects.", param)
        text = content_text(item.get("content"))
        chars += len(text)
        if item.get("role", "user") == "user":
            last_user = text
    return chars, last_user


def _plan_text(kind: str, document: dict, prompt_chars: int, last_user: str, limit_name: str,
               token_ratio: float) -> RoutePlan:
    limit = positive_int(document, limit_name)
    reply, completion_tokens, truncated = _reply(last_user, limit)
    prompt_tokens = scale_tokens(estimate_tokens(prompt_chars), token_ratio)
    stream, include_usage = streaming(document)
    return RoutePlan(kind, required_model(document), document,
                     prompt_tokens + (limit if limit is not None else completion_tokens),
                     stream, reply, prompt_tokens, completion_tokens, truncated, include_usage)


def _plan_responses(document: dict, token_ratio: float) -> RoutePlan:
    raw = document.get("input")
    if isinstance(raw, str):
        items: list = [{"role": "user", "content": raw}]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise BadRequest("Missing required parameter: 'input'.", "input")
    chars, last_user = _conversation(items, document.get("instructions"), "input")
    return _plan_text("responses", document, chars, last_user, "max_output_tokens", token_ratio)


def _plan_completions(document: dict, token_ratio: float) -> RoutePlan:
    prompt = document.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("Invalid 'prompt': the sandbox answers one string prompt.", "prompt")
    return _plan_text("completions", document, len(prompt), prompt, "max_tokens", token_ratio)


def _plan_messages(document: dict, token_ratio: float) -> RoutePlan:
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: Field required", "messages")
    if positive_int(document, "max_tokens") is None:
        raise BadRequest("max_tokens: Field required", "max_tokens")
    chars, last_user = _conversation(messages, document.get("system"), "messages")
    return _plan_text("messages", document, chars, last_user, "max_tokens", token_ratio)


def _plan_moderations(document: dict, token_ratio: float) -> RoutePlan:
    texts = input_texts(document)
    model = document.get("model") or "omni-moderation-latest"
    tokens = scale_tokens(estimate_tokens(sum(len(t) for t in texts)), token_ratio)
    return RoutePlan("moderations", model, document, tokens, prompt_tokens=tokens)


def _plan_images(document: dict, token_ratio: float) -> RoutePlan:
    prompt = document.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("Missing required parameter: 'prompt'.", "prompt")
    n = positive_int(document, "n") or 1
    if n > 10:
        raise BadRequest("Invalid 'n': at most 10.", "n")
    if document.get("response_format", "url") not in ("url", "b64_json"):
        raise BadRequest("Invalid 'response_format': expected 'url' or 'b64_json'.",
                         "response_format")
    tokens = scale_tokens(estimate_tokens(len(prompt)), token_ratio)
    return RoutePlan("images", document.get("model") or "dall-e-2", document, tokens)


def _plan_speech(document: dict, token_ratio: float) -> RoutePlan:
    text = document.get("input")
    if not isinstance(text, str) or not text:
        raise BadRequest("Missing required parameter: 'input'.", "input")
    if not isinstance(document.get("voice"), str):
        raise BadRequest("Missing required parameter: 'voice'.", "voice")
    if document.get("response_format", "mp3") not in SPEECH_TYPES:
        raise BadRequest(f"Invalid 'response_format': one of {', '.join(SPEECH_TYPES)}.",
                         "response_format")
    tokens = scale_tokens(estimate_tokens(len(text)), token_ratio)
    return RoutePlan("speech", required_model(document), document, tokens, prompt_tokens=tokens)


def _plan_transcriptions(document: dict, token_ratio: float) -> RoutePlan:
    """``document``: the form fields, and ``file`` as ``(filename, bytes, content type)``."""
    upload = document.get("file")
    if not isinstance(upload, tuple):
        raise BadRequest("Missing required parameter: 'file' (an upload).", "file")
    if document.get("response_format", "json") not in _TRANSCRIPT_FORMATS:
        raise BadRequest(f"Invalid 'response_format': one of {', '.join(_TRANSCRIPT_FORMATS)}.",
                         "response_format")
    filename, content, _ = upload
    text = f"sandbox transcript of {filename}: {len(content)} bytes"
    audio_tokens = max(1, len(content) // 100)
    return RoutePlan("transcriptions", required_model(document), document,
                     audio_tokens + estimate_tokens(len(text)), reply=text,
                     prompt_tokens=audio_tokens, completion_tokens=estimate_tokens(len(text)))


_PLANNERS = {"responses": _plan_responses, "completions": _plan_completions,
             "messages": _plan_messages, "moderations": _plan_moderations,
             "images": _plan_images, "speech": _plan_speech,
             "transcriptions": _plan_transcriptions}


def plan_route(kind: str, document: Any, token_ratio: float = 1.0) -> RoutePlan:
    """Validate a request of ``kind`` (one of :data:`ROUTE_KINDS`) and decide its answer.

    :raises BadRequest: when the API would answer 400.
    """
    if not isinstance(document, dict):
        raise BadRequest("The request body must be a JSON object.")
    return _PLANNERS[kind](document, token_ratio)

