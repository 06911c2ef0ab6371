"""The exception tree users catch.

Names and shape follow openai-python so that ``except openai.RateLimitError`` ports by
changing the import. Every message carries the server's own message and the request id,
because those are what a support ticket needs; none ever carries the API key.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Optional

from ._secrets import SecretFilter

if TYPE_CHECKING:  # pragma: no cover
    import requests

#: The exceptions users catch, exported as they are by ``cometkit`` (the helpers below that
#: build them are cometkit's own).
__all__ = [
    "CometError",
    "OpenAIError",
    "ConfigError",
    "PluginError",
    "APIError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "APIConnectionError",
    "APITimeoutError",
]

class CometError(Exception):
    """Base of every error cometkit raises on purpose."""


#: The openai SDK's name for the base of its exceptions, so ``except openai.OpenAIError``
#: ports by changing the import: it catches every API error and every configuration error.
OpenAIError = CometError


def error_object(body: Any) -> Any:
    """The inner ``error`` object of an OpenAI-style error body (``{"error": {...}}``), or the
    body itself when it has none: what openai-python calls an exception's ``body``."""
    return body.get("error", body) if isinstance(body, dict) else body


def _field(error: Any, name: str) -> Optional[str]:
    value = error.get(name) if isinstance(error, dict) else None
    return None if value is None else str(value)


class ConfigError(CometError, ValueError):
    """The configuration is invalid: the message names the file, the key path and the fix."""

    def __init__(
        self, message: str, *, path: Optional[str] = None, key: Optional[str] = None
    ) -> None:
        super().__init__(message)
        #: File the bad value came from, when it came from a file.
        self.path = path
        #: Dotted key path of the bad value (``plugins.backoff.max_attempts``).
        self.key = key


class PluginError(CometError):
    """A plugin could not be loaded or broke the hook contract."""


class APIError(CometError):
    """A call to the API failed. ``request_id`` is the provider's id when known.

    ``body``, ``code``, ``type`` and ``param`` read as in openai-python: ``body`` is the inner
    ``error`` object of the answer; the whole decoded answer is ``response_body``.
    """

    def __init__(
        self,
        message: str,
        *,
        request_id: Optional[str] = None,
        body: Any = None,
        code: Optional[str] = None,
        response_body: Any = None,
    ) -> None:
        """
        :param body: the whole decoded answer (``{"error": {...}}``) or its raw text;
            :attr:`body` keeps its inner ``error`` object.
        :param response_body: the whole answer when ``body`` is already the inner object
            (an error rebuilt from another keeps both this way).
        """
        super().__init__(message)
        self.message = message
        #: The provider's request id (``x-request-id`` header or found in the message).
        self.request_id = request_id
        #: The whole decoded answer as sent (``{"error": {...}}``), or its raw text when it
        #: was not JSON.
        self.response_body = body if response_body is None else response_body
        #: The answer's inner ``error`` object (``{"message", "type", "param", "code"}``),
        #: as openai-python's ``e.body``; the raw text when the answer was not JSON.
        self.body = error_object(body)
        #: The provider's machine-readable error code (``insufficient_quota``), if any; its
        #: ``type`` when the error object names no code.
        self.code = code
        #: The error object's ``type`` (``invalid_request_error``), if any.
        self.type = _field(self.body, "type")
        #: The request parameter the error is about (``messages``), if the server named one.
        self.param = _field(self.body, "param")


class APIStatusError(APIError):
    """The server answered with a non-success status code."""

    #: Status code this class stands for; ``None`` on the generic class.
    expected_status: Optional[int] = None

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        request_id: Optional[str] = None,
        body: Any = None,
        code: Optional[str] = None,
        response: Optional[requests.Response] = None,
        retry_after_s: Optional[float] = None,
        response_body: Any = None,
    ) -> None:
        super().__init__(message, request_id=request_id, body=body, code=code,
                         response_body=response_body)
        self.status_code = status_code
        #: The ``requests.Response`` (its body already read), when there was one.
        self.response = response
        #: The server's retry hint in seconds, when it sent one.
        self.retry_after_s = retry_after_s


class BadRequestError(APIStatusError):
    expected_status = 400


class AuthenticationError(APIStatusError):
    expected_status = 401


class PermissionDeniedError(APIStatusError):
    expected_status = 403


class NotFoundError(APIStatusError):
    expected_status = 404


class ConflictError(APIStatusError):
    expected_status = 409


class UnprocessableEntityError(APIStatusError):
    expected_status = 422


class RateLimitError(APIStatusError):
    """429, or a retry policy that gave up on one (budget spent, hint too long)."""

    expected_status = 429


class InternalServerError(APIStatusError):
    """Any status of 500 and above."""


class APIConnectionError(APIError):
    """The request did not get a complete HTTP answer (refused, reset, DNS, TLS, truncated)."""

    def __init__(self, message: str = "Connection error.", *, request_id: Optional[str] = None,
                 stage: str = "read") -> None:
        super().__init__(message, request_id=request_id)
        #: ``"connect"`` when the request never reached the server (always safe to retry),
        #: ``"read"`` when it broke after sending (the server may have done the work).
        self.stage = stage


class APITimeoutError(APIConnectionError):
    """The connect or read timeout expired, or the call's deadline did."""

    def __init__(self, message: str = "Request timed out.", *, request_id: Optional[str] = None,
                 stage: str = "read", deadline_s: Optional[float] = None) -> None:
        super().__init__(message, request_id=request_id, stage=stage)
        #: The call's deadline in seconds when that is what ran out (the message then says
        #: where the time went); ``None`` for one attempt's own connect or read timeout.
        self.deadline_s = deadline_s


#: Each class above by the status it stands for (the classes say it: ``expected_status``).
_STATUS_CLASSES = {cls.expected_status: cls for cls in APIStatusError.__subclasses__()
                   if cls.expected_status is not None}


def status_error_class(status_code: int) -> type[APIStatusError]:
    """The exception class that stands for ``status_code``."""
    if status_code >= 500:
        return InternalServerError
    return _STATUS_CLASSES.get(status_code, APIStatusError)


# CometAPI embeds its request id in the message text, e.g. "... (request id: 2025...abc)".
_REQUEST_ID_IN_TEXT = re.compile(r"request[ _-]?id[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9._-]{6,})", re.I)
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)
_MAX_TEXT = 300


def _describe_body(content: bytes, content_type: str) -> tuple[Any, str, Optional[str]]:
    """Decode an error body into ``(body, human message, error code)``."""
    text = content.decode("utf-8", "replace")
    try:
        body: Any = json.loads(text) if text.strip() else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("msg") or "").strip()
            code = err.get("code") or err.get("type")
            return body, message or text[:_MAX_TEXT], str(code) if code else None
        if isinstance(err, str):
            return body, err, None
        return body, text[:_MAX_TEXT], None
    looks_html = text.lstrip()[:15].lower().startswith(("<!doctype", "<html"))
    if "html" in content_type.lower() or looks_html:
        title = _HTML_TITLE.search(text)
        summary = " ".join(title.group(1).split()) if title else "an HTML page"
        message = f"the server answered with HTML ({summary}) instead of JSON: check base_url"
        return text, message, None
    return text or None, " ".join(text.split())[:_MAX_TEXT], None


def make_status_error(
    status_code: int,
    content: bytes,
    headers: Any,
    *,
    response: Optional[requests.Response] = None,
    retry_after_s: Optional[float] = None,
    method: str = "",
    route: str = "",
    secret: Optional[str] = None,
) -> APIStatusError:
    """Build the typed exception for an error answer, with message and request id found.

    Handles JSON error bodies (OpenAI style ``{"error": {...}}``), HTML pages that a wrong path
    or a gateway returns, and request ids embedded in the message text. ``secret`` (the API
    key) is blanked out of the body before anything is taken from it.
    """
    content_type = headers.get("content-type", "") if headers is not None else ""
    if secret:
        # a server or gateway that echoes the Authorization value must not leak the key
        # into the exception, the logs or a batch output file
        content = SecretFilter.for_secret(secret).bytes(content)
    body, message, code = _describe_body(content, content_type)
    if 300 <= status_code < 400:
        location = headers.get("location", "?") if headers is not None else "?"
        message = (f"the server redirected to {location} instead of answering: check base_url "
                   "(it should end in /v1)")
    request_id = None
    if headers is not None:
        request_id = headers.get("x-request-id") or headers.get("x-oneapi-request-id")
    if not request_id:
        found = _REQUEST_ID_IN_TEXT.search(message)
        request_id = found.group(1) if found else None
    where = f" for {method} {route}" if method else ""
    text = f"Error code: {status_code}{where} - {message or 'no message'}"
    if request_id and request_id not in text:
        text += f" (request id: {request_id})"
    cls = status_error_class(status_code)
    return cls(
        text,
        status_code=status_code,
        request_id=request_id,
        body=body,
        code=code,
        response=response,
        retry_after_s=retry_after_s,
    )
