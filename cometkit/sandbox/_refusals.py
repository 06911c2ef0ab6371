"""How the sandbox words a 429 and hints when to come back.

The wording imitates a provider or gateway (OpenAI, LiteLLM's parallel-request limiter,
new-api's upstream overload), because clients tell limits apart by it; the hint comes in the
configured ``retry_after`` style (seconds, milliseconds, an HTTP-date, a reset header, none).
"""

from __future__ import annotations

import email.utils
import math
from typing import Optional

from ..clock import Clock
from .limits import Admission, go_duration
from .responses import error_body

__all__ = ["Refusals", "ALWAYS_429_MESSAGE"]

#: The message of every 429 in ``always_429`` mode.
ALWAYS_429_MESSAGE = "Rate limit reached (the sandbox answers every request 429)."


class Refusals:
    """The body and headers of a sandbox's 429s, in its configured wording and hint style."""

    def __init__(self, retry_after: str, in_flight_style: str, overload_style: str,
                 max_in_flight: Optional[int], clock: Clock) -> None:
        self._retry_after = retry_after
        self._in_flight_litellm = in_flight_style == "litellm"
        self._overload_new_api = overload_style == "new-api"
        self._max_in_flight = max_in_flight
        self._clock = clock

    def refused(self, admission: Admission, model: Optional[str]) -> tuple[bytes, tuple]:
        """``(body, headers)`` of the 429 for a request the limits did not admit."""
        hint = admission.hint_s
        again = "later" if hint is None else f"in {go_duration(hint)}"
        type_ = "tokens" if admission.kind == "tokens" else "requests"
        code = "rate_limit_exceeded"
        if admission.kind == "in_flight" and self._in_flight_litellm:
            # LiteLLM's parallel-request limiter; clients tell a concurrency cap by this text.
            message = (f"Max parallel request limit reached. Hit limit for model {model}. "
                       f"rate_limit_type: max_parallel_requests, "
                       f"limit: {self._max_in_flight}, current: {self._max_in_flight}.")
            type_, code = "rate_limit_error", "429"
        elif admission.kind == "in_flight":
            message = f"Too many concurrent requests for model {model}."
        elif self._overload_new_api and not admission.windowed:
            message = "upstream saturated, please try again later"
            type_, code = "new_api_error", "insufficient_quota"
        elif admission.windowed:
            message = (f"Rate limit reached for {type_} on model {model} in the sandbox's "
                       f"fixed window. Please try again {again}.")
        else:
            message = (f"Rate limit reached for {admission.kind} on model {model} in the "
                       f"sandbox. Please try again {again}.")
        return self.too_many(type_, hint, admission.headers, message, code)

    def too_many(self, type_: str, wait_s: Optional[float], headers: tuple, message: str,
                 code: str = "rate_limit_exceeded") -> tuple[bytes, tuple]:
        """``(body, headers)`` of a 429 with the configured retry hint for ``wait_s``
        (``None``: no hint at all).

        The ``reset`` style puts the hint in the reset header of the limit that refused,
        replacing the true time left that header would otherwise carry.
        """
        hint: tuple = ()
        style = self._retry_after
        if wait_s is None:
            pass
        elif style == "seconds":
            hint = (("Retry-After", str(max(1, math.ceil(wait_s)))),)
        elif style == "ms":
            hint = (("retry-after-ms", str(max(1, math.ceil(wait_s * 1000)))),)
        elif style == "date":
            when = math.ceil(self._clock.time() + max(wait_s, 1.0))
            hint = (("Retry-After", email.utils.formatdate(when, usegmt=True)),)
        elif style == "reset":
            name = "x-ratelimit-reset-tokens" if type_ == "tokens" else "x-ratelimit-reset-requests"
            headers = tuple(h for h in headers if h[0] != name)
            hint = ((name, go_duration(wait_s)),)
        return error_body(message, type_, code), headers + hint
