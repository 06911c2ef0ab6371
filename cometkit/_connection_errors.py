"""Mapping what ``requests``, ``urllib3`` and the socket raise to cometkit's connection errors.

One mapping for every place that sends or reads (the transport, every stream, the
``requests`` adapter): *connect* (the request never reached the server, always safe to retry)
is told from *read* (it broke after sending), and a timeout from a broken connection. The
HTTP library may quote what the server sent in its messages, so the API key is blanked out
of them, and an exception chain that quotes it is left out rather than shown.
"""

from __future__ import annotations

import http.client
import socket
from typing import Any, Optional

import requests
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)

from ._exceptions import APIConnectionError, APITimeoutError
from ._secrets import SecretFilter

__all__ = ["TRANSPORT_ERRORS", "connection_error"]

#: Everything sending or reading may raise below cometkit: requests', urllib3's and the
#: socket's exceptions (map them with :func:`connection_error`).
TRANSPORT_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                    OSError, http.client.HTTPException)


def connection_error(exc: BaseException, secrets: Optional[SecretFilter] = None
                     ) -> APIConnectionError:
    """Map a ``requests``, ``urllib3`` or socket exception to ours, telling *connect* (never
    sent) from *read*, and a timeout from a broken connection wherever it happens (before the
    answer or inside a stream).

    The HTTP library quotes what the server sent in some messages (a malformed status or
    chunk-size line), so the text goes through ``secrets`` when given. ``exc`` is chained as
    the error's ``__cause__`` (what a traceback shows below it) unless some exception in its
    chain quotes the secret: then the chain is left out rather than shown.
    """
    error = _mapped_connection_error(exc)
    if secrets is not None:
        clean = secrets.text(error.message)
        if clean is not error.message:
            error = type(error)(clean, stage=error.stage)
    if secrets is None or _chain_is_clean(exc, secrets):
        error.__cause__ = exc
    return error


#: How deep :func:`_chain_is_clean` looks into an exception's causes and contexts.
_MAX_CHAIN = 16


def _chain_is_clean(exc: BaseException, secrets: SecretFilter) -> bool:
    """Whether no exception in ``exc``'s chain (causes and contexts, as a traceback prints
    them) has text or arguments holding the secret."""
    seen: set[int] = set()
    pending: list[Optional[BaseException]] = [exc]
    while pending and len(seen) < _MAX_CHAIN:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts = [str(current), *(str(arg) for arg in current.args)]
        if any(secrets.text(text) is not text for text in texts):
            return False
        pending += [current.__cause__, current.__context__]
    return not pending or all(item is None or id(item) in seen for item in pending)


def _mapped_connection_error(exc: BaseException) -> APIConnectionError:
    if isinstance(exc, (ReadTimeoutError, TimeoutError, socket.timeout)):
        return APITimeoutError(f"Read timeout: {exc}", stage="read")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return APITimeoutError(f"Connect timeout: {exc}", stage="connect")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return APITimeoutError(f"Read timeout: {exc}", stage="read")
    if isinstance(exc, MaxRetryError):
        reason: Any = exc.reason
    else:  # requests wraps urllib3's MaxRetryError (or ReadTimeoutError) in its own exception
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)
    # before ConnectTimeoutError: urllib3 2's NewConnectionError (a refused connection)
    # subclasses it, and a refusal is no timeout
    if isinstance(reason, (NewConnectionError, SSLError)) or isinstance(
            exc, requests.exceptions.SSLError):
        return APIConnectionError(f"Could not connect: {exc}", stage="connect")
    if isinstance(reason, ConnectTimeoutError):
        return APITimeoutError(f"Connect timeout: {exc}", stage="connect")
    if isinstance(reason, (ReadTimeoutError, TimeoutError, socket.timeout)):
        return APITimeoutError(f"Read timeout: {exc}", stage="read")
    return APIConnectionError(f"Connection broken: {type(exc).__name__}: {exc}", stage="read")
