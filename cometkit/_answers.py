"""What an HTTP answer tells the engine about its attempt.

``Client``, ``CometAdapter`` and ``cometkit.httpx.Transport`` each send an attempt their own
way, but read the answer the same way: status, headers and the provider's request id first;
then, for a complete answer, either the typed error of an error status (the retry policy and
the limiter decide on it) or the model and the token usage of a success (the limiter's token
rate and the metrics count them). Written once here, so the three fronts cannot drift; the
two that send through cometkit's own transport share the whole attempt
(:func:`send_attempt`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from ._bodies import answers_in_events
from ._engine import Sent, usage_tokens
from ._exceptions import APIConnectionError, APIError, make_status_error
from ._multipart import decode_upload
from ._secrets import SecretFilter
from ._transport import CompleteAnswer
from .plugin_api import AttemptResult

__all__ = ["failure_from", "json_object", "request_fields", "note_head", "note_body",
           "send_attempt"]


def json_object(body: Any, content_type: Optional[str]) -> Optional[dict]:
    """``body`` decoded when it is labelled JSON and holds an object; ``None`` otherwise
    (no body, another type, malformed JSON): for reading facts out of a message that is
    passed on as it is, never for judging it."""
    if not body or "json" not in (content_type or ""):
        return None
    try:
        value = json.loads(body)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def request_fields(body: Any, content_type: Optional[str]) -> Optional[dict]:
    """What a request sent that the engine reads (its ``model``, the text the token estimate
    counts): a JSON object body as :func:`json_object` gives it, or the text fields of an
    upload (``multipart/form-data``, the files left out); ``None`` for anything else."""
    fields = json_object(body, content_type)
    if fields is None:
        upload = decode_upload(content_type, body)
        if upload is not None:
            fields = {name: value for name, value in upload.items()
                      if not isinstance(value, tuple)}
    return fields


def _json_object_of(content: bytes, response: Any) -> Optional[dict]:
    return json_object(content, response.headers.get("Content-Type"))


def failure_from(follows_redirects: bool) -> int:
    """The one rule for which answers fail their attempt: a status of 400 or more, and a 3xx
    for a sender that follows no redirect (its caller would get a redirect, not an answer)."""
    return 400 if follows_redirects else 300


def note_head(result: AttemptResult, sent: Sent, response: Any, *,
              follows_redirects: bool = True) -> None:
    """Status, headers and the provider's request id: known as soon as the headers are; and
    whether the status fails the attempt (:func:`failure_from`, read back as
    :attr:`AttemptResult.accepted` by the limiters and the rest of the core)."""
    result.status_code = response.status_code
    result.headers = response.headers
    result.failure_from = failure_from(follows_redirects)
    sent.provider_request_id = response.headers.get("x-request-id")


def note_body(result: AttemptResult, sent: Sent, response: Any, content: bytes, *,
              method: str, route: str, secret: Optional[str] = None,
              decode: Callable[[bytes, Any], Any] = _json_object_of) -> Any:
    """Read a complete answer (after :func:`note_head`): a status that fails the attempt
    becomes its typed error (``secret`` blanked out of it, when the body was not blanked
    already); a success is decoded with ``decode`` (which may raise), and a JSON object's
    ``model`` and ``usage`` are noted.

    :returns: the decoded body of a success, ``None`` for an error status.
    """
    status = response.status_code
    if not result.accepted:
        full = response.as_response() if isinstance(response, CompleteAnswer) else response
        error = make_status_error(status, content, response.headers, response=full,
                                  method=method, route=route, secret=secret)
        result.error, result.error_code = error, error.code
        return None
    value = decode(content, response)
    if isinstance(value, dict):
        sent.response_model = value.get("model")
        result.input_tokens, result.output_tokens = usage_tokens(value.get("usage"))
    return value


def send_attempt(result: AttemptResult, send: Callable[[], Any], *, stream: bool, method: str,
                 route: str, secrets: SecretFilter, follows_redirects: bool = True,
                 secret: Optional[str] = None,
                 decode: Callable[[bytes, Any], Any] = _json_object_of) -> Sent:
    """One attempt through cometkit's transport (``send()`` calls its ``send``), read with
    :func:`note_head` and :func:`note_body`. An event-stream answer is left unread and held
    (``sent.streaming``); a connection failure becomes the attempt's ``APIConnectionError``
    (``sent.response`` is then ``None``); an undecodable success its ``APIError``.
    ``sent.value`` is the decoded body of a complete success."""
    sent = Sent()
    try:
        response = sent.response = send()
        note_head(result, sent, response, follows_redirects=follows_redirects)
        if answers_in_events(response, stream):
            sent.streaming = True
            return sent
        # read whole (and checked against its length) by the transport
        sent.value = note_body(result, sent, response, response.content, method=method,
                               route=route, secret=secret,
                               decode=decode)
    except APIConnectionError as exc:  # the transport's own: failed, broke, cut short
        result.error, result.error_stage = exc, exc.stage
        if sent.response is not None:
            sent.response.close()
        sent.response = None
    except APIError as exc:  # a success status with an undecodable body
        result.error = exc
    return sent
