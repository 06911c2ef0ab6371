"""The openai SDK's request options, checked once for every place that takes them.

``extra_headers``/``default_headers``, ``extra_query``/``default_query``, ``extra_body``,
``organization``/``project``, ``max_retries`` and a timeout object with ``.connect`` and
``.read`` (an ``httpx.Timeout``) arrive through ``Client(...)``, ``client.with_options(...)``
and every ``create()``; each is checked here, so a bad value gets the same clear error
wherever it was given, before anything is sent.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, Optional

__all__ = ["checked_headers", "checked_query", "identity_headers", "max_attempts_for",
           "timeout_parts", "request_body"]

#: The keywords every method takes besides its body fields: suggested for a typo too.
CALL_OPTIONS = ("extra_headers", "extra_query", "extra_body", "timeout", "deadline", "stream")
#: Characters an HTTP header name may hold (RFC 9110 ``token``).
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def checked_headers(name: str, value: Any) -> dict[str, str]:
    """``value`` (a mapping of header names to strings, or ``None``) as a new dict, or a
    ``TypeError``/``ValueError`` naming ``name`` and the header -- never its value, which may
    be a secret."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of header names to strings, got "
                        f"{type(value).__name__}")
    headers: dict[str, str] = {}
    for header, text in value.items():
        if not isinstance(header, str) or not header or not set(header) <= _TOKEN:
            raise ValueError(f"{name}: {header!r} is not a valid HTTP header name")
        if not isinstance(text, str):
            raise TypeError(f"{name}[{header!r}] must be a string, got {type(text).__name__}")
        if any(char in text for char in "\r\n\0"):
            raise ValueError(f"{name}[{header!r}]: a header value cannot hold a line break or "
                             "a NUL character (the value is not shown)")
        headers[header] = text
    return headers


def checked_query(name: str, value: Any) -> dict[str, Any]:
    """``value`` (a mapping of query parameters, or ``None``) as a new dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of query parameters, got "
                        f"{type(value).__name__}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}: query parameter names must be non-empty strings, got "
                             f"{key!r}")
    return dict(value)


def identity_headers(organization: Any, project: Any) -> dict[str, str]:
    """The headers the openai SDK sends for ``organization`` and ``project``."""
    return checked_headers("organization/project", {
        header: value for header, value in (("OpenAI-Organization", organization),
                                            ("OpenAI-Project", project)) if value is not None})


def max_attempts_for(max_retries: Any) -> int:
    """Attempts per call for the openai SDK's ``max_retries``: one more than it."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise TypeError(f"max_retries must be a whole number >= 0, got "
                        f"{type(max_retries).__name__} {max_retries!r}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be at least 0, got {max_retries}")
    return max_retries + 1


def timeout_parts(value: Any) -> Optional[dict[str, Any]]:
    """``{"connect": s, "read": s}`` for a timeout object with ``connect`` and ``read``
    attributes (an ``httpx.Timeout``, duck-typed: httpx is not imported), leaving out a part
    that is ``None``; ``None`` for any other value (a number, a pair, a mapping)."""
    if isinstance(value, (int, float, str, tuple, list, Mapping)) or value is None:
        return None
    if not (hasattr(value, "connect") and hasattr(value, "read")):
        return None
    return {part: getattr(value, part) for part in ("connect", "read")
            if getattr(value, part) is not None}


def request_body(method: str, fields: Mapping[str, Any], params: Mapping[str, Any],
                 known: Iterable[str], extra_body: Any) -> dict[str, Any]:
    """The JSON body of ``method`` (``"chat.completions.create"``): its required ``fields``,
    the optional ``params`` given by keyword, then ``extra_body`` merged over them.

    A keyword the openai API does not define for the route is refused with ``TypeError``
    (as the openai SDK does), naming a close match: a typo is not sent silently. A field of
    the provider's own goes in ``extra_body``.
    """
    known = frozenset(known)
    unknown = [name for name in params if name not in known]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, sorted(known) + list(CALL_OPTIONS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{method}() got an unexpected keyword argument {name!r}.{hint} A field "
                        f"the provider accepts beyond the openai API goes in "
                        f"extra_body={{{name!r}: ...}}.")
    return with_extra_body({**fields, **params}, extra_body)


def with_extra_body(body: Optional[Mapping[str, Any]], extra_body: Any) -> dict[str, Any]:
    """``body`` with ``extra_body`` (the provider's own fields) merged over it.

    :raises TypeError: ``extra_body`` is not a mapping.
    """
    if extra_body is not None and not isinstance(extra_body, Mapping):
        raise TypeError(f"extra_body must be a mapping of body fields, got "
                        f"{type(extra_body).__name__}")
    return {**(body or {}), **(extra_body or {})}
