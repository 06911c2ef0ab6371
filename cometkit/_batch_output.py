"""The output of ``cometkit batch``: what one result line says, and how a call becomes one.

Output lines are the OpenAI Batch output format::

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A failed call keeps its line: ``error`` is ``{"code", "message"}``, and ``response`` holds the
error answer when there was one (``null`` for a connection failure). This module is the one
place that builds such a record (:func:`call_record`), encodes it (:func:`encode_record`) and
reads one back (:func:`is_ok_record`, :func:`answer_usage`); the file they go into is
:mod:`cometkit._batch_journal`, the line they answer :mod:`cometkit._batch_input`.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Optional

from ._batch_input import BatchItem
from ._engine import usage_tokens
from ._exceptions import APIConnectionError, APIError, APIStatusError, APITimeoutError

__all__ = ["is_ok_record", "answer_usage", "count_usage", "encode_record", "call_record"]

logger = logging.getLogger("cometkit.batch")


def is_ok_record(record: Any) -> bool:
    """Whether an output line records a successful answer."""
    if not isinstance(record, dict) or record.get("error") is not None:
        return False
    response = record.get("response")
    if not isinstance(response, dict):
        return False
    status = response.get("status_code")
    return isinstance(status, int) and 200 <= status < 300


def answer_usage(response: Any) -> tuple[Optional[str], Optional[int], Optional[int]]:
    """``(model, input tokens, output tokens)`` of an output line's ``response``, from its
    body's ``model`` and ``usage`` (``None`` for what it does not say)."""
    body = response.get("body") if isinstance(response, dict) else None
    if not isinstance(body, dict):
        return None, None, None
    model = body.get("model") if isinstance(body.get("model"), str) else None
    input_tokens, output_tokens = usage_tokens(body.get("usage"))
    return (model, input_tokens if _is_count(input_tokens) else None,
            output_tokens if _is_count(output_tokens) else None)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def count_usage(usage_by_model: dict, response: Any) -> None:
    """Add one answer of an earlier run to ``usage_by_model`` (a plan's ``earlier_usage``:
    ``model -> (longest answer, input tokens, output tokens)``)."""
    model, input_tokens, output_tokens = answer_usage(response)
    if input_tokens is None and output_tokens is None:
        return  # an answer without usage: what it cost is not known
    longest, inputs, outputs = usage_by_model.get(model, (0, 0, 0))
    usage_by_model[model] = (max(longest, output_tokens or 0), inputs + (input_tokens or 0),
                             outputs + (output_tokens or 0))


def encode_record(record: dict) -> bytes:
    """One output line, newline included, that reads back to exactly ``record``.

    UTF-8 as it is; but a string holding a lone surrogate (half an emoji: ``"\\ud83d"`` is
    valid JSON, from the input or echoed by the server, yet not encodable as UTF-8) makes the
    whole line ASCII with ``\\u`` escapes instead. Either way the line is valid JSON whose
    values are the record's own, so a result is never lost to its encoding.
    """
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def call_record(client: Any, item: BatchItem,
                priority: Optional[str] = None) -> tuple[bool, dict]:
    """Send one request through ``client``; whether it was answered, and its output record,
    never an exception."""
    record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}",
                              "custom_id": item.custom_id, "response": None, "error": None}
    try:
        value = client.request(item.method, item.route, json=item.body, priority=priority)
    except APIStatusError as exc:
        record["response"] = {"status_code": exc.status_code, "request_id": exc.request_id,
                              "body": exc.response_body}
        record["error"] = {"code": exc.code or _status_code_name(exc.status_code),
                           "message": str(exc)}
        return False, record
    except APITimeoutError as exc:
        record["error"] = {"code": "timeout", "message": str(exc)}
        return False, record
    except APIConnectionError as exc:
        record["error"] = {"code": "connection_error", "message": str(exc)}
        return False, record
    except APIError as exc:
        record["error"] = {"code": exc.code or "api_error", "message": str(exc)}
        return False, record
    except Exception as exc:  # a line is never dropped, whatever went wrong
        logger.exception("custom_id %r failed unexpectedly", item.custom_id)
        record["error"] = {"code": "internal_error",
                           "message": f"{type(exc).__name__}: {exc}"}
        return False, record
    body = value.to_dict() if hasattr(value, "to_dict") else value
    request_id = getattr(value, "_request_id", None)
    record["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    return True, record


_STATUS_NAMES = {400: "bad_request", 401: "authentication_error", 403: "permission_denied",
                 404: "not_found", 409: "conflict", 422: "unprocessable_entity",
                 429: "rate_limit_exceeded"}


def _status_code_name(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _STATUS_NAMES.get(status, f"http_{status}")
