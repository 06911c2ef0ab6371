"""What the sandbox answers on the rest of the OpenAI surface (and Anthropic's ``/messages``):
the Responses API, legacy completions, moderations, images, speech and transcriptions.

Like :mod:`cometkit.sandbox.responses`, every answer is a function of the request alone (an
echo, a hash, the size of an upload), so runs repeat exactly; these routes are no benchmark
hot path, so bodies are built as dicts. Each request is planned before admission (its model
and the tokens the ``tpm`` limit charges), then answered whole or as server-sent events.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Optional

from .responses import (
    BadRequest,
    _model,
    _pieces,
    _positive_int,
    _text,
    estimate_tokens,
    scale_tokens,
)

__all__ = ["ROUTE_KINDS", "RoutePlan", "plan_route", "answer", "stream_events", "PNG_BYTES",
           "MODERATION_CATEGORIES"]

#: The routes planned here, by the kind the server names them with.
ROUTE_KINDS = ("responses", "completions", "messages", "moderations", "images", "speech",
               "transcriptions")
#: The categories of a moderation result; ``violence`` is flagged for a text saying "kill".
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic")
_SPEECH_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac",
                 "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}
_TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
_JSON = "application/json"


def _png() -> bytes:
    """A valid 1x1 PNG: what every generated image is."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\x40\x80\xc0")) + chunk(b"IEND", b""))


PNG_BYTES = _png()


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


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


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
    chars = len(_text(preamble)) if preamble else 0
    last_user = ""
    for item in items:
        if not isinstance(item, dict):
            raise BadRequest(f"Invalid '{param}': items must be objects.", param)
        text = _text(item.get("content"))
        chars += len(text)
        if item.get("role", "user") == "user":
            last_user = text
    return chars, last_user


def _plan_text(kind: str, document: dict, prompt_chars: int, last_user: str, limit_name: str,
               token_ratio: float) -> RoutePlan:
    limit = _positive_int(document, limit_name)
    reply, completion_tokens, truncated = _reply(last_user, limit)
    prompt_tokens = scale_tokens(estimate_tokens(prompt_chars), token_ratio)
    stream = document.get("stream") is True
    options = document.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return RoutePlan(kind, _model(document), document,
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
    if _positive_int(document, "max_tokens") is None:
        raise BadRequest("max_tokens: Field required", "max_tokens")
    chars, last_user = _conversation(messages, document.get("system"), "messages")
    return _plan_text("messages", document, chars, last_user, "max_tokens", token_ratio)


def _inputs(document: dict) -> list[str]:
    raw = document.get("input")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise BadRequest("Invalid 'input': expected a string or a non-empty array.", "input")
    return [item if isinstance(item, str) else _text([item]) for item in items]


def _plan_moderations(document: dict, token_ratio: float) -> RoutePlan:
    texts = _inputs(document)
    model = document.get("model") or "omni-moderation-latest"
    tokens = scale_tokens(estimate_tokens(sum(len(t) for t in texts)), token_ratio)
    return RoutePlan("moderations", model, document, tokens, prompt_tokens=tokens)


def _plan_images(document: dict, token_ratio: float) -> RoutePlan:
    prompt = document.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("Missing required parameter: 'prompt'.", "prompt")
    n = _positive_int(document, "n") or 1
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
    if document.get("response_format", "mp3") not in _SPEECH_TYPES:
        raise BadRequest(f"Invalid 'response_format': one of {', '.join(_SPEECH_TYPES)}.",
                         "response_format")
    tokens = scale_tokens(estimate_tokens(len(text)), token_ratio)
    return RoutePlan("speech", _model(document), document, tokens, prompt_tokens=tokens)


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
    return RoutePlan("transcriptions", _model(document), document,
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


# -- answers --------------------------------------------------------------------------------

def _response_usage(plan: RoutePlan) -> dict:
    return {"input_tokens": plan.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": plan.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": plan.prompt_tokens + plan.completion_tokens}


def response_object(plan: RoutePlan, number: int, created: int, *, done: bool = True) -> dict:
    """The Responses API object of ``plan`` (``done=False``: as ``response.created`` shows it,
    in progress with no output)."""
    message = {"type": "message", "id": f"msg_sandbox_{number}", "status": "completed",
               "role": "assistant",
               "content": [{"type": "output_text", "text": plan.reply, "annotations": []}]}
    status = ("incomplete" if plan.truncated else "completed") if done else "in_progress"
    document = plan.document
    return {
        "id": f"resp_sandbox_{number}", "object": "response", "created_at": created,
        "status": status, "model": plan.model, "output": [message] if done else [],
        "usage": _response_usage(plan) if done else None, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if done and plan.truncated
        else None,
        "instructions": document.get("instructions"),
        "max_output_tokens": document.get("max_output_tokens"),
        "metadata": document.get("metadata") or {}, "parallel_tool_calls": True,
        "previous_response_id": document.get("previous_response_id"),
        "temperature": document.get("temperature", 1.0), "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "tools": [], "top_p": document.get("top_p", 1.0),
        "store": document.get("store", True),
    }


def _completion_usage(plan: RoutePlan) -> dict:
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": plan.completion_tokens,
            "total_tokens": plan.prompt_tokens + plan.completion_tokens}


def _completion(plan: RoutePlan, number: int, created: int, choices: list,
                usage: Optional[dict]) -> dict:
    body = {"id": f"cmpl-sandbox-{number}", "object": "text_completion", "created": created,
            "model": plan.model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def _text_choice(text: str, finish_reason: Optional[str]) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def _message(plan: RoutePlan, number: int, *, done: bool = True) -> dict:
    return {"id": f"msg_sandbox_{number}", "type": "message", "role": "assistant",
            "model": plan.model,
            "content": [{"type": "text", "text": plan.reply}] if done else [],
            "stop_reason": ("max_tokens" if plan.truncated else "end_turn") if done else None,
            "stop_sequence": None,
            "usage": {"input_tokens": plan.prompt_tokens,
                      "output_tokens": plan.completion_tokens if done else 1}}


def _moderation(plan: RoutePlan, number: int) -> dict:
    results = []
    for text in _inputs(plan.document):
        violent = "kill" in text.lower()
        categories = {name: violent and name == "violence" for name in MODERATION_CATEGORIES}
        scores = {name: 0.9 if flagged else 0.0001 for name, flagged in categories.items()}
        results.append({"flagged": violent, "categories": categories,
                        "category_scores": scores,
                        "category_applied_input_types": {n: ["text"] for n in categories}})
    return {"id": f"modr-sandbox-{number}", "model": plan.model, "results": results}


def _images(plan: RoutePlan, number: int, created: int, origin: str) -> dict:
    import base64

    document = plan.document
    data = []
    for index in range(_positive_int(document, "n") or 1):
        if document.get("response_format") == "b64_json":
            item = {"b64_json": base64.b64encode(PNG_BYTES).decode("ascii")}
        else:
            item = {"url": f"{origin}/_sandbox/images/img-{number}-{index}.png"}
        data.append({**item, "revised_prompt": document["prompt"]})
    return {"created": created, "data": data}


def _speech(plan: RoutePlan) -> bytes:
    """Bytes that depend only on the text and voice: an ID3 tag and hashed frames, 16 bytes
    per character of text."""
    seed = f"{plan.document['voice']}:{plan.document['input']}".encode()
    frames = b"".join(hashlib.blake2b(seed + block.to_bytes(4, "little")).digest()
                      for block in range(-(-len(plan.document["input"]) // 4)))
    return b"ID3\x04\x00\x00\x00\x00\x00\x00" + frames


def _transcript(plan: RoutePlan) -> tuple[bytes, str]:
    fmt = plan.document.get("response_format", "json")
    text = plan.reply
    if fmt == "text":
        return text.encode(), "text/plain; charset=utf-8"
    if fmt in ("srt", "vtt"):
        head = "WEBVTT\n\n" if fmt == "vtt" else "1\n"
        stamp = "00:00:00.000 --> 00:00:01.000" if fmt == "vtt" else \
            "00:00:00,000 --> 00:00:01,000"
        return f"{head}{stamp}\n{text}\n".encode(), "text/plain; charset=utf-8"
    body: dict = {"text": text, "usage": {
        "type": "tokens", "input_tokens": plan.prompt_tokens,
        "output_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens}}
    if fmt == "verbose_json":
        body.update(task="transcribe", language=plan.document.get("language") or "english",
                    duration=1.0, segments=[])
    return _dumps(body), _JSON


def answer(plan: RoutePlan, number: int, created: int, origin: str = "") -> tuple[bytes, str]:
    """``(body, content type)`` of the whole answer to ``plan``; ``number`` makes ids unique,
    ``origin`` (``http://host:port``) is where image URLs point."""
    kind = plan.kind
    if kind == "responses":
        return _dumps(response_object(plan, number, created)), _JSON
    if kind == "completions":
        choice = _text_choice(plan.reply, "length" if plan.truncated else "stop")
        return _dumps(_completion(plan, number, created, [choice], _completion_usage(plan))), \
            _JSON
    if kind == "messages":
        return _dumps(_message(plan, number)), _JSON
    if kind == "moderations":
        return _dumps(_moderation(plan, number)), _JSON
    if kind == "images":
        return _dumps(_images(plan, number, created, origin)), _JSON
    if kind == "speech":
        return _speech(plan), _SPEECH_TYPES[plan.document.get("response_format", "mp3")]
    return _transcript(plan)


def _event(name: Optional[str], payload: Any) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def stream_events(plan: RoutePlan, number: int, created: int) -> list[bytes]:
    """The server-sent events of a streamed answer to ``plan`` (responses, completions or
    messages), in each API's own event format."""
    pieces = _pieces(plan.reply)
    if plan.kind == "completions":
        events = [_event(None, _completion(plan, number, created, [_text_choice(p, None)],
                                           None)) for p in pieces]
        events.append(_event(None, _completion(
            plan, number, created, [_text_choice("", "length" if plan.truncated else "stop")],
            None)))
        if plan.include_usage:
            events.append(_event(None, _completion(plan, number, created, [],
                                                   _completion_usage(plan))))
        return events + [b"data: [DONE]\n\n"]
    if plan.kind == "messages":
        events = [_event("message_start", {"type": "message_start",
                                           "message": _message(plan, number, done=False)}),
                  _event("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": {"type": "text", "text": ""}})]
        events += [_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta", "text": p}})
                   for p in pieces]
        events += [_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   _event("message_delta", {
                       "type": "message_delta",
                       "delta": {"stop_reason": "max_tokens" if plan.truncated else "end_turn",
                                 "stop_sequence": None},
                       "usage": {"output_tokens": plan.completion_tokens}}),
                   _event("message_stop", {"type": "message_stop"})]
        return events
    done = response_object(plan, number, created)
    message = done["output"][0]
    item_id = message["id"]
    started = {**message, "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    payloads: list[dict] = [
        {"type": "response.created", "response": response_object(plan, number, created,
                                                                 done=False)},
        {"type": "response.output_item.added", "output_index": 0, "item": started},
        {"type": "response.content_part.added", "item_id": item_id, "output_index": 0,
         "content_index": 0, "part": part}]
    payloads += [{"type": "response.output_text.delta", "item_id": item_id, "output_index": 0,
                  "content_index": 0, "delta": p, "logprobs": []} for p in pieces]
    payloads += [
        {"type": "response.output_text.done", "item_id": item_id, "output_index": 0,
         "content_index": 0, "text": plan.reply, "logprobs": []},
        {"type": "response.content_part.done", "item_id": item_id, "output_index": 0,
         "content_index": 0, "part": message["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed" if not plan.truncated else "response.incomplete",
         "response": done}]
    return [_event(p["type"], {**p, "sequence_number": i}) for i, p in enumerate(payloads)]
