"""Per-model admission in the sandbox: request and token buckets, fixed windows, and a
concurrency cap.

The sandbox plays a provider (or a gateway in front of one) that enforces limits, so it keeps
its own buckets and windows on its own clock (injectable: tests advance a fake clock instead of
sleeping) and answers with the rate-limit headers a real server sends, in the naming of the
family it imitates (OpenAI, LiteLLM, Anthropic).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

from ..buckets import TokenBucket

__all__ = ["go_duration", "rfc3339", "FixedWindow", "Admission", "RateLimits",
           "HEADER_FAMILIES", "WINDOW_ALIGNS", "WINDOW_RETRY_AFTERS"]

#: Rate-limit header naming: ``openai`` (``x-ratelimit-limit-requests``...), ``litellm``
#: (``x-ratelimit-api_key-limit-requests``..., no reset), ``anthropic``
#: (``anthropic-ratelimit-requests-limit``..., resets as timestamps), ``none``.
HEADER_FAMILIES = ("openai", "litellm", "anthropic", "none")
#: Where a fixed window starts: with the first request after the previous one ended (LiteLLM's
#: proxy), or on multiples of its length on the wall clock (a calendar minute: LiteLLM's router).
WINDOW_ALIGNS = ("first_request", "clock")
#: What a window's 429 hints: the time ``left`` in it, the ``window`` length (LiteLLM's inflated
#: value), or ``none`` (no hint, no reset headers).
WINDOW_RETRY_AFTERS = ("left", "window", "none")

#: Float noise allowance when comparing bucket levels.
_EPSILON = 1e-9


def go_duration(seconds: float) -> str:
    """``seconds`` as a Go duration, the format of ``x-ratelimit-reset-*`` (``250ms``, ``1m2.5s``).

    Rounded up to the millisecond: a client waiting this long is never early.
    """
    millis = math.ceil(seconds * 1000 - _EPSILON)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    minutes, millis = divmod(millis, 60_000)
    hours, minutes = divmod(minutes, 60)
    whole, frac = divmod(millis, 1000)
    text = f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def rfc3339(epoch_s: float) -> str:
    """``epoch_s`` as an RFC 3339 UTC timestamp (``2024-06-13T19:47:36Z``), Anthropic's reset
    format; rounded up to the second, so a client waiting until then is never early."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(epoch_s - _EPSILON)))


class FixedWindow:
    """At most ``limit`` units per window of ``length_s`` seconds. Not thread-safe: callers lock,
    and call :meth:`refresh` with the current time before the other methods.

    Unlike a bucket, nothing refills gradually: the whole allowance comes back at once when the
    window ends. A ``first_request`` window opens with the first request admitted after the
    previous one ended (a refused request does not start it); a ``clock`` window is
    ``[k * length_s, (k + 1) * length_s)`` of the time it is given. A cost larger than the limit
    is admitted into an unused window, which it uses up.
    """

    __slots__ = ("limit", "length_s", "by_clock", "start", "used", "now")

    def __init__(self, limit: float, length_s: float, by_clock: bool) -> None:
        self.limit = limit
        self.length_s = length_s
        self.by_clock = by_clock
        self.start = -math.inf
        self.used = 0.0
        self.now = 0.0

    def refresh(self, now: float) -> None:
        self.now = now
        if now >= self.start + self.length_s:
            self.start = (math.floor(now / self.length_s) * self.length_s if self.by_clock
                          else now)
            self.used = 0.0

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` can be taken (0 when it can now): the rest of the window."""
        if self.used <= 0 or self.used + cost <= self.limit + _EPSILON:
            return 0.0
        return self.left_s()

    def take(self, cost: float) -> None:
        if self.used <= 0 and not self.by_clock:
            self.start = self.now  # the first admitted request opens the window
        self.used += cost

    def remaining(self) -> int:
        return max(0, math.floor(self.limit - self.used + _EPSILON))

    def left_s(self) -> float:
        """Seconds until the allowance comes back (a window not yet opened would last all of
        ``length_s``)."""
        if self.used <= 0 and not self.by_clock:
            return self.length_s
        return max(0.0, self.start + self.length_s - self.now)


def _anthropic(side: str) -> tuple:
    return tuple(f"anthropic-ratelimit-{side}-{part}" for part in ("limit", "remaining", "reset"))


#: Per family and limit (``requests``, ``tokens``): ``(limit, remaining, reset)`` header names,
#: reset ``None`` when the family sends none. Anthropic's ``input-tokens`` repeat the one token
#: limit the sandbox keeps, which is charged with the prompt.
_FAMILY_NAMES = {
    "openai": {name: ((f"x-ratelimit-limit-{name}", f"x-ratelimit-remaining-{name}",
                       f"x-ratelimit-reset-{name}"),) for name in ("requests", "tokens")},
    "litellm": {name: ((f"x-ratelimit-api_key-limit-{name}",
                        f"x-ratelimit-api_key-remaining-{name}", None),)
                for name in ("requests", "tokens")},
    "anthropic": {
        "requests": (_anthropic("requests"),),
        "tokens": (_anthropic("tokens"), _anthropic("input-tokens")),
    },
    "none": {"requests": (), "tokens": ()},
}


@dataclass(frozen=True)
class Admission:
    """The answer to "may this request be served now?".

    :ivar ok: admitted; the caller must :meth:`RateLimits.release` it when done.
    :ivar kind: when refused, the limit hit: ``requests``, ``tokens``, ``window`` (a request
        window) or ``in_flight``.
    :ivar wait_s: when refused, seconds until the request would be admitted.
    :ivar headers: rate-limit headers for the answer, ``(name, value)`` pairs.
    :ivar hint_s: when refused, the wait the 429 hints (not always the true one: windows may
        inflate it to their length, a concurrency cap names a fixed value); ``None`` for none.
    :ivar windowed: when refused, a fixed window refused (not a bucket).
    """

    ok: bool
    kind: Optional[str] = None
    wait_s: float = 0.0
    headers: tuple = ()
    hint_s: Optional[float] = None
    windowed: bool = False


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_Limit = Union[TokenBucket, FixedWindow]


class _ModelState:
    __slots__ = ("requests", "tokens", "serving")

    def __init__(self, requests: Optional[_Limit], tokens: Optional[_Limit]) -> None:
        self.requests = requests
        self.tokens = tokens
        self.serving = 0


class RateLimits:
    """Limits applied to each model separately, as providers do.

    :param requests_per_s: request refill rate (from rpm or rps), ``None`` for no limit.
    :param request_burst: request bucket capacity; default one second's worth, at least 1.
    :param request_limit: requests per minute, for the limit-requests header.
    :param tpm: tokens per minute, charged per request; bucket holds one second's worth.
    :param max_in_flight: requests of one model served at once.
    :param in_flight_retry_s: the wait hinted when ``max_in_flight`` refuses a request.
    :param monotonic: the clock of buckets and ``first_request`` windows.
    :param window_requests: requests per fixed window of ``window_s`` (instead of a bucket).
    :param window_s: the length of request windows.
    :param token_window_s: when set, ``tpm`` is enforced per fixed window of this length
        (``tpm * token_window_s / 60`` tokens each) instead of a bucket.
    :param window_align: one of :data:`WINDOW_ALIGNS`.
    :param window_retry_after: one of :data:`WINDOW_RETRY_AFTERS`.
    :param header_family: one of :data:`HEADER_FAMILIES`.
    :param reset_on_refusal: send reset headers on 429s too (off when the server hints nothing).
    :param wall_time: the wall clock (epoch seconds): ``clock`` windows and timestamp resets.
    """

    def __init__(self, *, requests_per_s: Optional[float], request_burst: Optional[float],
                 request_limit: Optional[float], tpm: Optional[float],
                 max_in_flight: Optional[int], in_flight_retry_s: float,
                 monotonic: Callable[[], float], window_requests: Optional[int] = None,
                 window_s: float = 60.0, token_window_s: Optional[float] = None,
                 window_align: str = "first_request", window_retry_after: str = "left",
                 header_family: str = "openai", reset_on_refusal: bool = True,
                 wall_time: Callable[[], float] = time.time) -> None:
        self._request_rate = requests_per_s
        self._request_capacity = (request_burst if request_burst else
                                  max(1.0, requests_per_s or 0.0))
        self._request_limit = request_limit
        self._window_requests = window_requests
        self._window_s = window_s
        self._token_window_s = token_window_s
        self._token_rate = tpm / 60.0 if tpm and not token_window_s else None
        self._token_capacity = max(1.0, self._token_rate or 0.0)
        self._token_limit = tpm * token_window_s / 60.0 if tpm and token_window_s else tpm
        self._max_in_flight = max_in_flight
        self._in_flight_retry_s = in_flight_retry_s
        self._by_clock = window_align == "clock"
        self._window_retry_after = window_retry_after
        self._names = _FAMILY_NAMES[header_family]
        self._family_resets = header_family in ("openai", "anthropic")
        self._family_silent = header_family == "none"
        self._timestamp_resets = header_family == "anthropic"
        self._reset_on_refusal = reset_on_refusal
        self._monotonic = monotonic
        self._wall_time = wall_time
        self._lock = threading.Lock()
        self._models: dict = {}

    def _state(self, model: str, now: float) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            requests: Optional[_Limit] = None
            if self._request_rate:
                requests = TokenBucket(self._request_rate, self._request_capacity, now)
            elif self._window_requests:
                requests = FixedWindow(self._window_requests, self._window_s, self._by_clock)
            tokens: Optional[_Limit] = None
            if self._token_rate:
                tokens = TokenBucket(self._token_rate, self._token_capacity, now)
            elif self._token_window_s and self._token_limit:
                tokens = FixedWindow(self._token_limit, self._token_window_s, self._by_clock)
            state = self._models[model] = _ModelState(requests, tokens)
        return state

    def admit(self, model: str, cost: int) -> Admission:
        """Admit one request of ``model`` charging ``cost`` tokens, or say which limit refuses."""
        now = self._monotonic()
        # Windows aligned to the clock count on the wall clock, as a calendar minute does.
        window_now = self._wall_time() if self._by_clock else now
        with self._lock:
            state = self._state(model, now)
            for limit in (state.requests, state.tokens):
                if type(limit) is FixedWindow:
                    limit.refresh(window_now)
                elif limit is not None:
                    limit.refill(now)  # a TokenBucket
            kind, wait, limit_hit = None, 0.0, None
            if self._max_in_flight is not None and state.serving >= self._max_in_flight:
                kind, wait = "in_flight", self._in_flight_retry_s
            for name, limit, charge in (("requests", state.requests, 1),
                                        ("tokens", state.tokens, cost)):
                if kind is None and limit is not None:
                    # a window's time is the one refresh() was given
                    wait = (limit.wait_s(charge) if type(limit) is FixedWindow
                            else limit.wait_s(charge, now))
                    if wait > 0:
                        kind, limit_hit = name, limit
            if kind is None:
                for limit, charge in ((state.requests, 1), (state.tokens, cost)):
                    if type(limit) is FixedWindow:
                        limit.take(charge)
                    elif limit is not None:
                        limit.take(charge, now)
                state.serving += 1
                return Admission(True, headers=self._headers(state, None, 0.0, now))
            headers = self._headers(state, kind, wait, now)
        windowed = type(limit_hit) is FixedWindow
        hint: Optional[float] = wait
        if windowed:
            hint = {"left": wait, "window": limit_hit.length_s,
                    "none": None}[self._window_retry_after]
            if kind == "requests":
                kind = "window"
        return Admission(False, kind, wait, headers, hint, windowed)

    def release(self, model: str) -> None:
        """An admitted request of ``model`` has been answered."""
        with self._lock:
            self._models[model].serving -= 1

    def _headers(self, state: _ModelState, kind: Optional[str], wait: float,
                 now: float) -> tuple:
        """Rate-limit headers in the configured family's names.

        A bucket reports as OpenAI does for a per-minute limit enforced in shorter buckets: the
        limit per minute, remaining as the bucket's share of it, and reset as the wait when that
        limit refused (else the time until the bucket is full). A window reports its own limit,
        what is left of it and the time left in it (no reset when its 429s hint nothing).
        """
        if self._family_silent:
            return ()
        headers: list = []
        with_reset = self._family_resets and (kind is None or self._reset_on_refusal)
        for name, limit, total in (("requests", state.requests, self._request_limit),
                                   ("tokens", state.tokens, self._token_limit)):
            if limit is None:
                continue
            reset: Optional[float]
            if type(limit) is FixedWindow:
                total = limit.limit
                remaining = limit.remaining()
                reset = limit.left_s() if self._window_retry_after != "none" else None
            elif total:
                remaining = limit.remaining(total, now)
                reset = wait if kind == name else limit.to_full_s(now)
            else:
                continue
            total_text, remaining_text = _number(total), str(remaining)
            reset_text = self._reset_text(reset) if with_reset and reset is not None else None
            for limit_name, remaining_name, reset_name in self._names[name]:
                headers += [(limit_name, total_text), (remaining_name, remaining_text)]
                if reset_name is not None and reset_text is not None:
                    headers.append((reset_name, reset_text))
        return tuple(headers)

    def _reset_text(self, reset_s: float) -> str:
        if self._timestamp_resets:
            return rfc3339(self._wall_time() + reset_s)
        return go_duration(reset_s)
