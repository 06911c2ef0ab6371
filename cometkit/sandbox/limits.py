"""Per-model admission in the sandbox: request and token buckets, and a concurrency cap.

The sandbox plays a provider that enforces limits, so it keeps its own buckets on its own
clock (injectable: tests advance a fake clock instead of sleeping) and answers with the
``x-ratelimit-*`` headers a real provider sends.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["go_duration", "TokenBucket", "Admission", "RateLimits"]

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


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second. Not thread-safe: callers lock.

    A cost larger than the capacity is admitted when the bucket is full and leaves it in debt,
    so a big request is slow rather than impossible.
    """

    __slots__ = ("rate", "capacity", "level", "stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` can be taken (0 when it can now)."""
        missing = min(cost, self.capacity) - self.level
        return 0.0 if missing <= _EPSILON else missing / self.rate

    def take(self, cost: float) -> None:
        self.level -= cost

    def remaining(self, limit: float) -> int:
        """The bucket's fill as a share of ``limit`` (the per-minute limit), floored."""
        return max(0, math.floor(self.level / self.capacity * limit + _EPSILON))

    def to_full_s(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass(frozen=True)
class Admission:
    """The answer to "may this request be served now?".

    :ivar ok: admitted; the caller must :meth:`RateLimits.release` it when done.
    :ivar kind: when refused, the limit hit: ``requests``, ``tokens`` or ``in_flight``.
    :ivar wait_s: when refused, seconds until the request would be admitted.
    :ivar headers: ``x-ratelimit-*`` headers for the answer, ``(name, value)`` pairs.
    """

    ok: bool
    kind: Optional[str] = None
    wait_s: float = 0.0
    headers: tuple = ()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _ModelState:
    __slots__ = ("requests", "tokens", "serving")

    def __init__(self, requests: Optional[TokenBucket], tokens: Optional[TokenBucket]) -> None:
        self.requests = requests
        self.tokens = tokens
        self.serving = 0


class RateLimits:
    """Limits applied to each model separately, as providers do.

    :param requests_per_s: request refill rate (from rpm or rps), ``None`` for no limit.
    :param request_burst: request bucket capacity; default one second's worth, at least 1.
    :param request_limit: requests per minute, for ``x-ratelimit-limit-requests``.
    :param tpm: tokens per minute, charged per request; bucket holds one second's worth.
    :param max_in_flight: requests of one model served at once.
    :param in_flight_retry_s: the wait hinted when ``max_in_flight`` refuses a request.
    :param monotonic: the clock.
    """

    def __init__(self, *, requests_per_s: Optional[float], request_burst: Optional[float],
                 request_limit: Optional[float], tpm: Optional[float],
                 max_in_flight: Optional[int], in_flight_retry_s: float,
                 monotonic: Callable[[], float]) -> None:
        self._request_rate = requests_per_s
        self._request_capacity = (request_burst if request_burst else
                                  max(1.0, requests_per_s or 0.0))
        self._request_limit = request_limit
        self._token_rate = tpm / 60.0 if tpm else None
        self._token_capacity = max(1.0, self._token_rate or 0.0)
        self._token_limit = tpm
        self._max_in_flight = max_in_flight
        self._in_flight_retry_s = in_flight_retry_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._models: dict = {}

    def _state(self, model: str, now: float) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = _ModelState(
                TokenBucket(self._request_rate, self._request_capacity, now)
                if self._request_rate else None,
                TokenBucket(self._token_rate, self._token_capacity, now)
                if self._token_rate else None,
            )
        return state

    def admit(self, model: str, cost: int) -> Admission:
        """Admit one request of ``model`` charging ``cost`` tokens, or say which limit refuses."""
        now = self._monotonic()
        with self._lock:
            state = self._state(model, now)
            for bucket in (state.requests, state.tokens):
                if bucket is not None:
                    bucket.refill(now)
            kind, wait = None, 0.0
            if self._max_in_flight is not None and state.serving >= self._max_in_flight:
                kind, wait = "in_flight", self._in_flight_retry_s
            if kind is None and state.requests is not None:
                wait = state.requests.wait_s(1)
                kind = "requests" if wait > 0 else None
            if kind is None and state.tokens is not None:
                wait = state.tokens.wait_s(cost)
                kind = "tokens" if wait > 0 else None
            if kind is None:
                if state.requests is not None:
                    state.requests.take(1)
                if state.tokens is not None:
                    state.tokens.take(cost)
                state.serving += 1
            headers = self._headers(state, kind, wait)
        return Admission(kind is None, kind, wait, headers)

    def release(self, model: str) -> None:
        """An admitted request of ``model`` has been answered."""
        with self._lock:
            self._models[model].serving -= 1

    def _headers(self, state: _ModelState, kind: Optional[str], wait: float) -> tuple:
        """``x-ratelimit-*`` as OpenAI sends them for a per-minute limit enforced in shorter
        buckets: limit per minute, remaining as the bucket's share of it, and reset as the
        wait when that limit refused (else the time until the bucket is full)."""
        headers = []
        for name, bucket, limit in (("requests", state.requests, self._request_limit),
                                    ("tokens", state.tokens, self._token_limit)):
            if bucket is None or not limit:
                continue
            reset = wait if kind == name else bucket.to_full_s()
            headers += [(f"x-ratelimit-limit-{name}", _number(limit)),
                        (f"x-ratelimit-remaining-{name}", str(bucket.remaining(limit))),
                        (f"x-ratelimit-reset-{name}", go_duration(reset))]
        return tuple(headers)
