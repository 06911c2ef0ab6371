"""What the sandbox answers on the routes of :mod:`~cometkit.sandbox.routes`, once planned.

Each API's own shapes: Responses API objects and events, legacy completions and their
chunks, Anthropic messages and events, moderation results, image URLs (or base64 PNGs),
speech bytes and transcripts in every ``response_format``. The bodies are built as dicts
(these routes are no benchmark hot path) from the plan alone, so runs repeat exactly.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from typing import TYPE_CHECKING, Any, Optional

from ._json import JSON, dumps
from ._reading import input_texts, positive_int
from .responses import DONE_EVENT, stream_pieces, token_usage

if TYPE_CHECKING:
    from .routes import RoutePlan

__all__ = ["answer", "stream_events", "response_object", "PNG_BYTES", "MODERATION_CATEGORIES",
           "SPEECH_TYPES"]

#: The categories of a moderation result; ``violence`` is flagged for a text saying "kill".
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic")
#: The content type of each speech ``response_format``.
SPEECH_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac",
                "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}


def _png() -> bytes:
    """A valid 1x1 PNG: what every generated image is."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\x40\x80\xc0")) + chunk(b"IEND", b""))


PNG_BYTES = _png()


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
    for text in input_texts(plan.document):
        violent = "kill" in text.lower()
        categories = {name: violent and name == "violence" for name in MODERATION_CATEGORIES}
        scores = {name: 0.9 if flagged else 0.0001 for name, flagged in categories.items()}
        results.append({"flagged": violent, "categories": categories,
                        "category_scores": scores,
                        "category_applied_input_types": {n: ["text"] for n in categories}})
    return {"id": f"modr-sandbox-{number}", "model": plan.model, "results": results}


def _images(plan: RoutePlan, number: int, created: int, origin: str) -> dict:
    document = plan.document
    data = []
    for index in range(positive_int(document, "n") or 1):
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
    return dumps(body), JSON


def answer(plan: RoutePlan, number: int, created: int, origin: str = "") -> tuple[bytes, str]:
    """``(body, content type)`` of the whole answer to ``plan``; ``number`` makes ids unique,
    ``origin`` (``http://host:port``) is where image URLs point."""
    kind = plan.kind
    if kind == "responses":
        return dumps(response_object(plan, number, created)), JSON
    if kind == "completions":
        choice = _text_choice(plan.reply, "length" if plan.truncated else "stop")
        return dumps(_completion(plan, number, created, [choice], token_usage(plan))), \
            JSON
    if kind == "messages":
        return dumps(_message(plan, number)), JSON
    if kind == "moderations":
        return dumps(_moderation(plan, number)), JSON
    if kind == "images":
        return dumps(_images(plan, number, created, origin)), JSON
    if kind == "speech":
        return _speech(plan), SPEECH_TYPES[plan.document.get("response_format", "mp3")]
    return _transcript(plan)


def _event(name: Optional[str], payload: Any) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + dumps(payload) + b"\n\n"


def stream_events(plan: RoutePlan, number: int, created: int) -> list[bytes]:
    """The server-sent events of a streamed answer to ``plan`` (responses, completions or
    messages), in each API's own event format."""
    pieces = stream_pieces(plan.reply)
    if plan.kind == "completions":
        events = [_event(None, _completion(plan, number, created, [_text_choice(p, None)],
                                           None)) for p in pieces]
        events.append(_event(None, _completion(
            plan, number, created, [_text_choice("", "length" if plan.truncated else "stop")],
            None)))
        if plan.include_usage:
            events.append(_event(None, _completion(plan, number, created, [],
                                                   token_usage(plan))))
        return events + [DONE_EVENT]
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
