"""What the sandbox answers: OpenAI-shaped bodies, deterministic and cheap to build.

Benchmarks push thousands of calls through the sandbox, so the hot paths fill precomputed
templates with already-escaped strings instead of building and serialising dicts per request.
Every answer is a function of the request alone (an echo, a hash), so runs repeat exactly.
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

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_EMBEDDING_DIMENSIONS",
    "BadRequest",
    "ChatPlan",
    "EmbeddingPlan",
    "estimate_tokens",
    "scale_tokens",
    "plan_chat",
    "plan_embeddings",
    "chat_body",
    "chat_stream_events",
    "embeddings_body",
    "embedding_vector",
    "models_body",
    "model_body",
    "error_body",
]

DEFAULT_MODELS = ("gpt-4o-mini", "claude-3-5-haiku", "text-embedding-3-small")
#: Small on purpose: vectors cost hashing time per request. ``dimensions`` asks for more.
DEFAULT_EMBEDDING_DIMENSIONS = 32
MAX_EMBEDDING_DIMENSIONS = 4096
#: Long answers are streamed in at most this many content chunks.
MAX_STREAM_PIECES = 32


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


def _text(content: Any) -> str:
    """The text of a message ``content``: a string, or the ``text`` of its content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"] for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _positive_int(body: dict, name: str) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"Invalid '{name}': expected a positive integer.", name)
    return value


def _model(body: Any) -> str:
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", "model")
    return model


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


def plan_chat(body: Any, token_ratio: float = 1.0) -> ChatPlan:
    """Validate a ``/chat/completions`` body and decide the answer: ``echo: <last user text>``.

    ``token_ratio`` scales the prompt's token count (see :func:`scale_tokens`), in ``usage``
    and in the charge alike.

    :raises BadRequest: when the API would answer 400.
    """
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("Missing required parameter: 'messages'.", "messages")
    prompt_chars = 0
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("Invalid 'messages': every message must be an object.", "messages")
        text = _text(message.get("content"))
        prompt_chars += len(text)
        if message.get("role") == "user":
            last_user = text
    reply = "echo: " + last_user
    completion_tokens = estimate_tokens(len(reply))
    limit = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    finish_reason = "stop"
    if limit is not None and completion_tokens > limit:
        reply, completion_tokens, finish_reason = reply[: limit * 4], limit, "length"
    prompt_tokens = scale_tokens(estimate_tokens(prompt_chars), token_ratio)
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    charge = prompt_tokens + (limit if limit is not None else completion_tokens)
    return ChatPlan(model, reply, finish_reason, prompt_tokens, completion_tokens, stream,
                    include_usage, charge)


_CHAT = (
    '{"id":"chatcmpl-sandbox-%d","object":"chat.completion","created":%d,"model":%s,'
    '"choices":[{"index":0,"message":{"role":"assistant","content":%s,"refusal":null},'
    '"logprobs":null,"finish_reason":"%s"}],'
    '"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d},'
    '"system_fingerprint":"fp_sandbox"}'
)


def chat_body(plan: ChatPlan, number: int, created: int) -> bytes:
    """The JSON answer to a non-streaming chat request; ``number`` makes the id unique."""
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


def _pieces(text: str) -> list[str]:
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
    deltas = ['{"role":"assistant","content":""}']
    deltas += [f'{{"content":{_quote(piece)}}}' for piece in _pieces(plan.reply)]
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
    model = _model(body)
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
    dimensions = _positive_int(body, "dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
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
    return json.dumps({
        "object": "list",
        "data": data,
        "model": plan.model,
        "usage": {"prompt_tokens": plan.prompt_tokens, "total_tokens": plan.prompt_tokens},
    }, separators=(",", ":")).encode()


def _model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "cometkit-sandbox"}


def models_body(models: Sequence[str], created: int) -> bytes:
    """The ``GET /models`` list."""
    return json.dumps({"object": "list", "data": [_model_object(m, created) for m in models]},
                      separators=(",", ":")).encode()


def model_body(model_id: str, created: int) -> bytes:
    """The ``GET /models/{id}`` answer."""
    return json.dumps(_model_object(model_id, created), separators=(",", ":")).encode()


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
