"""What the Redis store does while Redis cannot be reached (``on_redis_error``).

:class:`RedisFallback` knows whether Redis answers: the first failure is logged once and says
what happens instead -- attempts fall back to an in-process ``AdmissionLimiter`` built from the
same options (``local``, the default), go out unlimited (``fail_open``) or fail with
``RateLimitError`` (``fail_closed``) -- and Redis is tried again every few seconds (one thread
pings; the others keep to the fallback meanwhile).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping, Optional

from cometkit import AttemptResult, Clock, RateLimitError, RequestInfo, Throttle

from .local import AdmissionLimiter

__all__ = ["OPEN", "LocalPermit", "RedisFallback", "RECONNECT_INTERVAL_S"]

logger = logging.getLogger("cometkit.redis_limiter")

#: While Redis is unreachable, try it again after this many seconds.
RECONNECT_INTERVAL_S = 5.0


class LocalPermit:
    """A permit of the in-process fallback limiter, admitted while Redis was unreachable."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner


class _OpenPermit:
    """Admitted without limits (``fail_open`` while Redis was unreachable)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<redis_limiter open permit>"


OPEN = _OpenPermit()


class RedisFallback:
    """Whether Redis answers, and the admission of attempts while it does not.

    :param redis: the ``redis.Redis`` client (pinged to see whether Redis is back).
    :param errors: what a dead or stuck Redis raises.
    :param mode: ``on_redis_error``: ``local``, ``fail_open`` or ``fail_closed``.
    :param options: the validated section the ``local`` fallback limiter is built from.
    :param max_concurrency: the fallback's concurrency (the store's, as a number).
    :param reconnect_interval_s: seconds between tries while Redis is unreachable.
    :param clock: the clock the tries are timed on and the fallback limiter runs on.
    :param url_shown: the Redis URL for messages, without credentials.
    """

    def __init__(self, redis: Any, errors: tuple, *, mode: str, options: Mapping[str, Any],
                 max_concurrency: int, reconnect_interval_s: float, clock: Clock,
                 url_shown: str) -> None:
        self._redis = redis
        self.errors = errors
        self.mode = mode
        self._options = options
        self._max_concurrency = max_concurrency
        self.reconnect_interval_s = reconnect_interval_s
        self.clock = clock
        self.url_shown = url_shown
        # Reachability: None while Redis answers, else clock.monotonic() of the last failure.
        self._down_at: Optional[float] = None
        self._state_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self.local: Optional[AdmissionLimiter] = None

    @property
    def down(self) -> bool:
        """Redis did not answer last time it was asked."""
        return self._down_at is not None

    def usable(self) -> bool:
        """Whether to use Redis for this attempt: it answered last time, or it is time to try
        again (one thread tries; the others keep to the fallback meanwhile)."""
        if self._down_at is None:
            return True
        if self.clock.monotonic() - self._down_at < self.reconnect_interval_s:
            return False
        if not self._probe_lock.acquire(blocking=False):
            return False
        try:
            if self._down_at is None:
                return True
            try:
                self._redis.ping()
            except self.errors as exc:
                with self._state_lock:
                    self._down_at = self.clock.monotonic()
                logger.debug("Redis at %s is still unreachable: %s: %s", self.url_shown,
                             type(exc).__name__, exc)
                return False
            with self._state_lock:
                self._down_at = None
            logger.warning("Redis at %s answers again: shared limits apply again",
                           self.url_shown)
            return True
        finally:
            self._probe_lock.release()

    def went_down(self, exc: BaseException) -> None:
        """Redis failed to answer with ``exc``: fall back until it answers again."""
        with self._state_lock:
            first = self._down_at is None
            self._down_at = self.clock.monotonic()
        if not first:
            return
        instead = {
            "local": "this process applies the limits alone (in-process limiter)",
            "fail_open": "attempts go out without limits",
            "fail_closed": "attempts fail with RateLimitError",
        }[self.mode]
        logger.warning("Redis at %s is unreachable (%s: %s): %s until it answers again "
                       "(tried every %g s)", self.url_shown, type(exc).__name__, exc, instead,
                       self.reconnect_interval_s)

    def acquire(self, request: RequestInfo, deadline: Optional[float]) -> Any:
        """Admit ``request`` without Redis, as ``on_redis_error`` says."""
        if self.mode == "fail_open":
            return OPEN
        if self.mode == "fail_closed":
            raise RateLimitError(
                f"redis_limiter: Redis at {self.url_shown} is unreachable and on_redis_error "
                f"is fail_closed: {request.method} {request.route} "
                f"model={request.model or '-'} was not sent", status_code=429)
        with self._state_lock:
            if self.local is None:
                self.local = AdmissionLimiter.from_options(
                    self._options, concurrency=self._max_concurrency, clock=self.clock)
            local = self.local
        remaining = None if deadline is None else max(0.0, deadline - self.clock.monotonic())
        return LocalPermit(local.acquire(request, remaining))

    def release(self, permit: LocalPermit, result: AttemptResult) -> Optional[Throttle]:
        """Give a permit of the in-process fallback back."""
        if self.local is not None:
            return self.local.release(permit.inner, result)
        return None

    def after_fork(self) -> None:
        """In a forked child: locks another thread of the parent held stay held; new ones."""
        self._state_lock = threading.Lock()
        self._probe_lock = threading.Lock()
