"""What the sandbox answers: OpenAI-shaped bodies, deterministic and cheap to build.

Benchmarks push thousands of calls through the sandbox, so the hot paths fill precomputed
templates with already-escaped strings instead of building and serialising dicts per request.
Every answer is a function of the request alone (an echo, a hash), so runs repeat exactly.

This module plans and answers chat, embeddings and the models list, and holds the error and
fault bodies. What every planner reads of a request is :mod:`~cometkit.sandbox._reading`'s;
tool calls and ``response_format`` documents are :mod:`~cometkit.sandbox._structured`'s.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Optional, Sequence

from ._json import dumps
from ._reading import (
    BadRequest,
    content_text,
    estimate_tokens,
    positive_int,
    required_model,
    scale_tokens,
    streaming,
)
from ._structured import example_value, formatted_reply, tool_call_for

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_EMBEDDING_DIMENSIONS",
    "BadRequest",
    "ChatPlan",
    "EmbeddingPlan",
    "estimate_tokens",
    "scale_tokens",
    "plan_chat",
    "example_value",
    "plan_embeddings",
    "chat_body",
    "chat_stream_events",
    "embeddings_body",
    "embedding_vector",
    "models_body",
    "model_body",
    "error_body",
    "stream_pieces",
    "token_usage",
    "DONE_EVENT",
]

DEFAULT_MODELS = ("gpt-4o-mini", "claude-3-5-haiku", "text-embedding-3-small")
#: Small on purpose: vectors cost hashing time per request. ``dimensions`` asks for more.
DEFAULT_EMBEDDING_DIMENSIONS = 32
MAX_EMBEDDING_DIMENSIONS = 4096
#: Long answers are streamed in at most this many content chunks.
MAX_STREAM_PIECES = 32


@dataclass(frozen=True)
class ChatPlan:
    """A chat request and its answer, decided before admission so tpm can charge for it."""

    model: str
    reply: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stream: bool
    include_usage: bool
    #: Tokens charged against tpm: the prompt plus ``max_tokens`` (or the answer when unset).
    charge: int
    #: ``(function name, arguments JSON)`` when the answer is a tool call instead of text.
    tool_call: Optional[tuple[str, str]] = None


def plan_chat(body: Any, token_ratio: float = 1.0) -> ChatPlan:
    """Validate a ``/chat/completions`` body and decide the answer: ``echo: <text>`` of the
    last user message (or tool result); a tool call when ``tools`` ask for one; a JSON
    document for a ``json_schema``/``json_object`` ``response_format``.

    ``token_ratio`` scales the prompt's token count (see :func:`scale_tokens`), in ``usage``
    and in the charge alike.

    :raises BadRequest: when the API would answer 400.
    """
    model = required_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("Missing required parameter: 'messages'.", "messages")
    prompt_chars = 0
    last_user = ""
    last_role = None
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("Invalid 'messages': every message must be an object.", "messages")
        text = content_text(message.get("content"))
        prompt_chars += len(text)
        last_role = message.get("role")
        if last_role in ("user", "tool"):
            last_user = text
    tool_call = tool_call_for(body, last_role, last_user)
    formatted = formatted_reply(body, last_user)
    reply = "" if tool_call else formatted if formatted is not None else "echo: " + last_user
    completion_tokens = estimate_tokens(len(reply) + sum(map(len, tool_call or ())))
    limit = positive_int(body, "max_completion_tokens") or positive_int(body, "max_tokens")
    finish_reason = "tool_calls" if tool_call else "stop"
    if limit is not None and completion_tokens > limit and not tool_call:
        reply, completion_tokens, finish_reason = reply[: limit * 4], limit, "length"
    prompt_tokens = scale_tokens(estimate_tokens(prompt_chars), token_ratio)
    stream, include_usage = streaming(body)
    charge = prompt_tokens + (limit if limit is not None else completion_tokens)
    return ChatPlan(model, reply, finish_reason, prompt_tokens, completion_tokens, stream,
                    include_usage, charge, tool_call)


_CHAT = (
    '{"id":"chatcmpl-sandbox-%d","object":"chat.completion","created":%d,"model":%s,'
    '"choices":[{"index":0,"message":{"role":"assistant","content":%s,"refusal":null},'
    '"logprobs":null,"finish_reason":"%s"}],'
    '"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d},'
    '"system_fingerprint":"fp_sandbox"}'
)


def _tool_message(plan: ChatPlan, number: int, *, index: bool) -> dict:
    assert plan.tool_call is not None
    name, arguments = plan.tool_call
    call: dict = {"id": f"call_sandbox_{number}", "type": "function",
                  "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": None, "refusal": None,
            "tool_calls": [{"index": 0, **call} if index else call]}


def token_usage(plan: Any) -> dict:
    """The ``usage`` object of a chat or legacy completion answer to ``plan``."""
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": plan.completion_tokens,
            "total_tokens": plan.prompt_tokens + plan.completion_tokens}


def chat_body(plan: ChatPlan, number: int, created: int) -> bytes:
    """The JSON answer to a non-streaming chat request; ``number`` makes the id unique."""
    if plan.tool_call is not None:
        return json.dumps({
            "id": f"chatcmpl-sandbox-{number}", "object": "chat.completion", "created": created,
            "model": plan.model, "choices": [{
                "index": 0, "message": _tool_message(plan, number, index=False),
                "logprobs": None, "finish_reason": plan.finish_reason}],
            "usage": token_usage(plan), "system_fingerprint": "fp_sandbox"}).encode()
    return (_CHAT % (
        number, created, _quote(plan.model), _quote(plan.reply), plan.finish_reason,
        plan.prompt_tokens, plan.completion_tokens, plan.prompt_tokens + plan.completion_tokens,
    )).encode()


_CHUNK = (
    'data: {"id":"chatcmpl-sandbox-%d","object":"chat.completion.chunk","created":%d,'
    '"model":%s,"system_fingerprint":"fp_sandbox","choices":[%s]%s}\n\n'
)
_DELTA = '{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}'
_USAGE = '"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}'
_WORDS = re.compile(r"\s*\S+\s*|\s+")
DONE_EVENT = b"data: [DONE]\n\n"


def stream_pieces(text: str) -> list[str]:
    """``text`` cut at word boundaries into at most :data:`MAX_STREAM_PIECES` pieces."""
    words = _WORDS.findall(text)
    size = max(1, math.ceil(len(words) / MAX_STREAM_PIECES))
    return ["".join(words[i:i + size]) for i in range(0, len(words), size)]


def chat_stream_events(plan: ChatPlan, number: int, created: int) -> list[bytes]:
    """Server-sent events for a streaming chat answer, each ``data: {...}\\n\\n``.

    A role chunk, one chunk per piece of content, a finish chunk, the usage chunk (empty
    ``choices``) when ``stream_options.include_usage`` asked for it, and ``data: [DONE]``.
    """
    head = (number, created, _quote(plan.model))
    usage_null = ',"usage":null' if plan.include_usage else ""
    if plan.tool_call is not None:
        deltas = [json.dumps(_tool_message(plan, number, index=True))]
    else:
        deltas = ['{"role":"assistant","content":""}']
        deltas += [f'{{"content":{_quote(piece)}}}' for piece in stream_pieces(plan.reply)]
    events = [_CHUNK % (*head, _DELTA % (delta, "null"), usage_null) for delta in deltas]
    events.append(_CHUNK % (*head, _DELTA % ("{}", f'"{plan.finish_reason}"'), usage_null))
    if plan.include_usage:
        usage = _USAGE % (plan.prompt_tokens, plan.completion_tokens,
                          plan.prompt_tokens + plan.completion_tokens)
        events.append(_CHUNK % (*head, "", "," + usage))
    return [event.encode() for event in events] + [DONE_EVENT]


@dataclass(frozen=True)
class EmbeddingPlan:
    """An embeddings request: one text per input (token arrays are keyed by their numbers)."""

    model: str
    inputs: tuple
    prompt_tokens: int
    dimensions: int
    base64: bool

    @property
    def charge(self) -> int:
        return self.prompt_tokens


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value)


def plan_embeddings(body: Any, token_ratio: float = 1.0) -> EmbeddingPlan:
    """Validate an ``/embeddings`` body (``input``: a string, strings, token arrays).

    ``token_ratio`` scales the tokens counted for strings (token arrays count one per token).

    :raises BadRequest: when the API would answer 400.
    """
    model = required_model(body)
    raw = body.get("input")
    if isinstance(raw, str) or (_is_tokens(raw) and raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise BadRequest("Invalid 'input': expected a string or a non-empty array.", "input")
    inputs = []
    text_tokens = 0
    array_tokens = 0
    for item in raw:
        if isinstance(item, str):
            inputs.append(item)
            text_tokens += estimate_tokens(len(item))
        elif _is_tokens(item) and item:
            inputs.append(" ".join(map(str, item)))
            array_tokens += len(item)
        else:
            raise BadRequest("Invalid 'input': items must be strings or token arrays.", "input")
    tokens = array_tokens + (scale_tokens(text_tokens, token_ratio) if text_tokens else 0)
    dimensions = positive_int(body, "dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
    if dimensions > MAX_EMBEDDING_DIMENSIONS:
        raise BadRequest(f"Invalid 'dimensions': at most {MAX_EMBEDDING_DIMENSIONS}.",
                         "dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("Invalid 'encoding_format': expected 'float' or 'base64'.",
                         "encoding_format")
    return EmbeddingPlan(model, tuple(inputs), tokens, dimensions, encoding == "base64")


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on ``text`` and ``dimensions`` (blake2b, not a model)."""
    seed = text.encode("utf-8", "surrogatepass")
    raw = b"".join(
        hashlib.blake2b(block.to_bytes(4, "little") + seed, digest_size=64).digest()
        for block in range(math.ceil(dimensions / 32))
    )
    values = struct.unpack(f"<{dimensions}h", raw[: 2 * dimensions])
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embeddings_body(plan: EmbeddingPlan) -> bytes:
    """The JSON answer to an embeddings request (floats, or base64 little-endian float32)."""
    data = []
    for index, text in enumerate(plan.inputs):
        vector = embedding_vector(text, plan.dimensions)
        if plan.base64:
            packed = struct.pack(f"<{len(vector)}f", *vector)
            encoded: Any = base64.b64encode(packed).decode("ascii")
        else:
            encoded = vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return dumps({
        "object": "list",
        "data": data,
        "model": plan.model,
        "usage": {"prompt_tokens": plan.prompt_tokens, "total_tokens": plan.prompt_tokens},
    })


def _model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "cometkit-sandbox"}


def models_body(models: Sequence[str], created: int) -> bytes:
    """The ``GET /models`` list."""
    return dumps({"object": "list", "data": [_model_object(m, created) for m in models]})


def model_body(model_id: str, created: int) -> bytes:
    """The ``GET /models/{id}`` answer."""
    return dumps(_model_object(model_id, created))


def error_body(message: str, type_: str, code: Optional[str] = None,
               param: Optional[str] = None) -> bytes:
    """An OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": code}}).encode()


#: Fixed answers for injected faults, built once.
SERVER_ERROR_BODIES = {
    500: error_body("The server had an error while processing your request. Sorry about that!",
                    "server_error"),
    502: error_body("Bad gateway.", "server_error", "bad_gateway"),
    503: error_body("The engine is currently overloaded, please try again later.",
                    "server_error", "overloaded"),
    504: error_body("Gateway timeout.", "server_error", "gateway_timeout"),
}
QUOTA_BODY = error_body(
    "You exceeded your current quota, please check your plan and billing details.",
    "insufficient_quota", "insufficient_quota")
HTML_502_BODY = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
INVALID_JSON_BODY = b'{"id": "chatcmpl-sandbox", "choices": [{"message": <!-- upstream cut -->'
INVALID_JSON_EVENT = b'data: {"id": "chatcmpl-sandbox", "choices": [<!-- upstream cut -->\n\n'
