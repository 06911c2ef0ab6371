"""Reading the server's rate-limit headers (and the wording of its 429s).

The retry policy (how long to wait), the limiters (when to slow down) and the exception (what
to tell the caller) all read these, so they are parsed in one place, once per answer, into a
:class:`RateLimitHints`. Malformed, negative, infinite or absurd values read as "no hint": a
broken header must never make a client sleep for a day or not at all.

Three header families are read, because gateways in front of CometAPI rename them:

- OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (reset as a Go duration);
- LiteLLM's per-descriptor names, ``x-ratelimit-<descriptor>-{limit,remaining}-{requests,tokens}``
  (``x-ratelimit-api_key-remaining-requests``): the tightest descriptor wins;
- Anthropic's ``anthropic-ratelimit-{requests,tokens,input-tokens}-{limit,remaining,reset}``
  (reset as an RFC 3339 timestamp).
"""

from __future__ import annotations

import email.utils
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping, Optional

__all__ = [
    "parse_duration",
    "retry_after_s",
    "RateLimitHints",
    "parse_hints",
    "refusal_kind",
    "refusal_text",
    "RefusalRules",
    "DEFAULT_REFUSALS",
    "TOO_LARGE_WORDS",
    "QUOTA_CODES",
    "WAIT_WORDS",
    "ABSURD_HINT_S",
]

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
    hint = _explicit_retry_after(headers, now_epoch_s)
    if hint is not None:
        return hint
    resets = [
        parse_duration(headers[name])
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if headers.get(name)
    ]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


def _explicit_retry_after(headers: Mapping[str, str], now_epoch_s: float) -> Optional[float]:
    """``retry-after-ms``, else ``Retry-After`` (seconds or an HTTP-date), else ``None``."""
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
    return None


# -------------------------------------------------------------------------------------------
# Everything an answer says about the server's limits, parsed once
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimitHints:
    """What one answer's headers (and, for a 429, its body) say about the server's limits.

    Built once per answer by :func:`parse_hints`; the retry policy, the limiters and the
    exception read it instead of parsing headers again. Every field is ``None`` when the answer
    did not say (or said something malformed).

    :ivar retry_after_s: ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP-date).
    :ivar reset_requests_s: seconds until the request limit is full again.
    :ivar reset_tokens_s: seconds until the token limit is full again.
    :ivar remaining_requests: requests the server will still accept in its current period.
    :ivar limit_requests: the request limit (per minute for OpenAI-style headers).
    :ivar remaining_tokens: tokens still available.
    :ivar limit_tokens: the token limit.
    :ivar refusal: for a 429, which limit refused: ``requests``, ``tokens`` or ``concurrency``
        (a cap on calls in flight, as LiteLLM's ``max_parallel_requests``), from the body's
        wording and the headers; ``None`` when it cannot be told.
    """

    retry_after_s: Optional[float] = None
    reset_requests_s: Optional[float] = None
    reset_tokens_s: Optional[float] = None
    remaining_requests: Optional[int] = None
    limit_requests: Optional[int] = None
    remaining_tokens: Optional[int] = None
    limit_tokens: Optional[int] = None
    refusal: Optional[str] = None

    @property
    def wait_s(self) -> Optional[float]:
        """The server's requested wait: ``retry_after_s``, else the longer reset, else ``None``
        (the value :func:`retry_after_s` returns)."""
        if self.retry_after_s is not None:
            return self.retry_after_s
        resets = [r for r in (self.reset_requests_s, self.reset_tokens_s) if r is not None]
        return max(resets) if resets else None


_NO_HINTS = RateLimitHints()

#: Error codes of a 429 that mean a spent quota or balance (or a request too large for any
#: limit): no limit to wait for. The default of ``backoff.give_up_codes``.
QUOTA_CODES = frozenset({
    "insufficient_quota",
    "insufficient_user_quota",
    "insufficient_balance",
    "billing_hard_limit_reached",
    "quota_exceeded",
    "context_length_exceeded",
    "request_too_large",
})
#: Words of a 429 message that mean "try later" even under a quota code: gateways built on
#: new-api word an upstream overload as ``insufficient_quota`` with "saturated, please try
#: again later". The default of ``backoff.wait_despite``.
WAIT_WORDS = ("saturated", "饱和", "try again later", "retry later")
#: OpenAI's words for a request larger than the whole limit ("Request too large for gpt-4o
#: ... on tokens per min"): no wait makes it fit.
TOO_LARGE_WORDS = "request too large"
#: Wording of a 429 that refuses for the number of calls in flight rather than their rate.
_CONCURRENCY_WORDS = ("parallel", "concurren", "in flight", "in-flight", "simultaneous")
_TOKEN_WORDS = ("token",)


@dataclass(frozen=True)
class RefusalRules:
    """Which 429s mean "do not wait": a spent quota or balance, or a request too large for any
    limit. One value, read by the one parse of every answer (:func:`parse_hints`), so the retry
    policy and the limiters agree on it: a policy that gives up on a 429 never has the limiter
    hold its lane for it, and one that waits has the limiter treat it as a limit.

    The retry policy owns the lists (``backoff.give_up_codes`` / ``backoff.wait_despite`` in
    YAML) and hands them to the core as its ``refusal_rules`` attribute.

    :ivar quota_codes: lower-case error codes (the body's ``code``/``type``, or a word of its
        message) that mean a spent quota.
    :ivar wait_words: lower-case words of the message that mean "try later" even under one of
        ``quota_codes`` (gateways built on new-api say ``insufficient_quota`` for an overload).
    """

    quota_codes: frozenset = QUOTA_CODES
    wait_words: tuple = WAIT_WORDS

    @classmethod
    def of(cls, quota_codes: Iterable[Any], wait_words: Iterable[Any]) -> RefusalRules:
        """Rules from configured lists (any case; empty words dropped)."""
        return cls(frozenset(str(code).lower() for code in quota_codes),
                   tuple(str(words).lower() for words in wait_words if words))

    def quota_reason(self, message: Any) -> Optional[str]:
        """The quota code (or ``request too large``) that makes this 429 hopeless, ``None``
        when it names none or says to try later."""
        if not isinstance(message, str) or not message:
            return None
        text = message.lower()
        if any(wait in text for wait in self.wait_words):
            return None
        if TOO_LARGE_WORDS in text:
            return TOO_LARGE_WORDS
        return next((word for word in re.findall(r"[a-z_]+", text)
                     if word in self.quota_codes), None)

    def kind(self, message: Any) -> Optional[str]:
        """``quota`` (a spent quota: no limit to wait for), ``concurrency`` or ``tokens`` when
        a 429's words say which limit refused, else ``None`` (a plain rate limit, or wording
        this does not know)."""
        if not isinstance(message, str) or not message:
            return None
        if self.quota_reason(message) is not None:
            return "quota"
        text = message.lower()
        if any(word in text for word in _CONCURRENCY_WORDS):
            return "concurrency"
        if any(word in text for word in _TOKEN_WORDS):
            return "tokens"
        return None


#: The rules with the default lists.
DEFAULT_REFUSALS = RefusalRules()


def _int(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    try:
        number = int(float(value.strip()))
    except (ValueError, OverflowError):
        return None
    return number if number >= 0 else None


def _timestamp_wait(value: str, now_epoch_s: float) -> Optional[float]:
    """Seconds until an RFC 3339 timestamp (Anthropic's resets), ``None`` if malformed."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return parse_duration(value)
    if when.tzinfo is None:
        return None
    return _finite(max(0.0, when.timestamp() - now_epoch_s))


def _tighter(current: Optional[tuple[int, Optional[int]]], remaining: Optional[int],
             limit: Optional[int]) -> Optional[tuple[int, Optional[int]]]:
    if remaining is None:
        return current
    if current is None or remaining < current[0]:
        return remaining, limit
    return current


def parse_hints(headers: Optional[Mapping[str, str]], now_epoch_s: float,
                message: Optional[str] = None,
                rules: RefusalRules = DEFAULT_REFUSALS) -> RateLimitHints:
    """Parse every rate-limit header of an answer (and, for a 429, its error ``message``).

    :param headers: a case-insensitive mapping of the answer's headers.
    :param now_epoch_s: the wall-clock time, for HTTP-date and timestamp values.
    :param message: the error message of a 429 body, to tell which limit refused.
    :param rules: which 429s mean a spent quota (the retry policy's lists).
    """
    if not headers:
        return _NO_HINTS if message is None else RateLimitHints(refusal=rules.kind(message))
    requests: Optional[tuple[int, Optional[int]]] = None
    tokens: Optional[tuple[int, Optional[int]]] = None
    reset_requests = reset_tokens = None
    descriptors: dict[str, dict[str, str]] = {}
    for raw_name in headers:
        name = raw_name.lower()
        if name.startswith("x-ratelimit-"):
            rest = name[12:]
            if rest in ("reset-requests", "reset-tokens"):
                value = parse_duration(headers[raw_name])
                if rest == "reset-requests":
                    reset_requests = value
                else:
                    reset_tokens = value
                continue
            for suffix in ("-requests", "-tokens"):
                if not rest.endswith(suffix):
                    continue
                head = rest[: -len(suffix)]
                for field in ("limit", "remaining"):
                    if head == field or head.endswith("-" + field):
                        descriptor = head[: -len(field)].rstrip("-")
                        descriptors.setdefault(descriptor + suffix, {})[field] = headers[raw_name]
        elif name.startswith("anthropic-ratelimit-"):
            rest = name[20:]
            for family in ("requests", "tokens", "input-tokens", "output-tokens"):
                if not rest.startswith(family + "-"):
                    continue
                field = rest[len(family) + 1:]
                if field == "reset":
                    wait = _timestamp_wait(headers[raw_name], now_epoch_s)
                    if family == "requests":
                        reset_requests = wait
                    elif wait is not None:
                        reset_tokens = wait if reset_tokens is None else max(reset_tokens, wait)
                elif field in ("limit", "remaining"):
                    key = "anthropic-" + family + ("-requests" if family == "requests"
                                                   else "-tokens")
                    descriptors.setdefault(key, {})[field] = headers[raw_name]
                break
    for key, fields in descriptors.items():
        remaining, limit = _int(fields.get("remaining")), _int(fields.get("limit"))
        if limit == 0:
            limit = None
        if key.endswith("-requests"):
            requests = _tighter(requests, remaining, limit)
        else:
            tokens = _tighter(tokens, remaining, limit)
    hint = _explicit_retry_after(headers, now_epoch_s)
    refusal = rules.kind(message) if message is not None else None
    if refusal is None and message is not None:
        if tokens is not None and tokens[0] == 0 and (requests is None or requests[0] > 0):
            refusal = "tokens"
        elif requests is not None and requests[0] == 0:
            refusal = "requests"
    if (hint is None and reset_requests is None and reset_tokens is None and requests is None
            and tokens is None and refusal is None):
        return _NO_HINTS
    return RateLimitHints(
        retry_after_s=hint, reset_requests_s=reset_requests, reset_tokens_s=reset_tokens,
        remaining_requests=requests[0] if requests else None,
        limit_requests=requests[1] if requests else None,
        remaining_tokens=tokens[0] if tokens else None,
        limit_tokens=tokens[1] if tokens else None,
        refusal=refusal)


def refusal_text(error: Optional[BaseException]) -> str:
    """The words of an error answer that say which limit refused: the body's ``error``
    message, type and code (or the raw body text)."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return " ".join(str(inner.get(key) or "") for key in ("message", "type", "code"))
        return str(inner)
    return body if isinstance(body, str) else ""


def refusal_kind(message: Any, rules: RefusalRules = DEFAULT_REFUSALS) -> Optional[str]:
    """:meth:`RefusalRules.kind` under ``rules`` (the default lists unless told)."""
    return rules.kind(message)
