"""Reading the server's rate-limit headers.

Both the retry policy (how long to wait) and the limiter (when to slow down) read these, so
they are parsed in one place. Malformed, negative, infinite or absurd values read as "no hint":
a broken header must never make a client sleep for a day or not at all.
"""

from __future__ import annotations

import email.utils
import math
import re
from typing import Mapping, Optional

__all__ = ["parse_duration", "retry_after_s", "ratelimit_remaining", "ABSURD_HINT_S"]

#: Hints longer than this (one day) are treated as garbage, not as instructions.
ABSURD_HINT_S = 86_400.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _finite(value: float) -> Optional[float]:
    if math.isnan(value) or math.isinf(value) or value < 0 or value > ABSURD_HINT_S:
        return None
    return value


def parse_duration(text: str) -> Optional[float]:
    """Seconds in a Go-style duration (``1s``, ``6m0s``, ``250ms``, ``1h2m``) or a bare number.

    :returns: seconds, or ``None`` when ``text`` is not a sane duration.
    """
    text = text.strip().lower()
    if not text:
        return None
    try:
        return _finite(float(text))
    except ValueError:
        pass
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        number, unit = float(match.group(1)), match.group(2)
        total += number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = match.end()
    if pos != len(text) or pos == 0:
        return None
    return _finite(total)


def retry_after_s(headers: Optional[Mapping[str, str]], now_epoch_s: float) -> Optional[float]:
    """The server's requested wait in seconds, or ``None`` when it gave no usable hint.

    Looks at, in order: ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP-date, measured
    against ``now_epoch_s``) and ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens``
    (the longer of the two).

    :param headers: a case-insensitive mapping (``requests``' headers are).
    :param now_epoch_s: the current wall-clock time, for HTTP-date values.
    """
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            hint = _finite(float(value) / 1000.0)
        except ValueError:
            hint = None
        if hint is not None:
            return hint
    value = headers.get("retry-after")
    if value is not None:
        value = value.strip()
        try:
            hint = _finite(float(value))
        except ValueError:
            hint = None
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None and when.tzinfo is not None:
                hint = _finite(max(0.0, when.timestamp() - now_epoch_s))
        if hint is not None:
            return hint
    resets = [
        parse_duration(headers[name])
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if headers.get(name)
    ]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


def ratelimit_remaining(headers: Optional[Mapping[str, str]]) -> Optional[tuple[int, int]]:
    """``(remaining, limit)`` of requests from ``x-ratelimit-*-requests`` headers, if both sane."""
    if not headers:
        return None
    try:
        remaining = int(headers["x-ratelimit-remaining-requests"])
        limit = int(headers["x-ratelimit-limit-requests"])
    except (KeyError, TypeError, ValueError):
        return None
    if remaining < 0 or limit <= 0:
        return None
    return remaining, limit
