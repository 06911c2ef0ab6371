"""The in-process store of the limiting plan: :class:`AdmissionLimiter`.

Every attempt waits here for a slot before it is sent and gives the slot back when it ends
(the core sleeps between retries *without* a slot). A call needs a slot of the client
(``max_concurrency``, ``requests_per_minute``, ``tokens_per_minute``) and one of its model's
lane (the ``models:`` overrides, and what adaptive mode learned for that model), so a model
that is refused slows down alone. Rates are token buckets holding ``burst`` seconds' worth,
not a minute's: a minute's burst at start-up is exactly what earns 429s.

Waiters are admitted by priority, then first come, first served: the waiting attempt of the
highest priority lane (``RequestInfo.priority_rank``) goes first, and within a lane the
oldest call (per model: a call whose model is at its limit does not block calls for other
models, but nothing overtakes an older or higher call of its own model or one waiting for the
client's own limits). A lower lane is never stopped outright: once its oldest waiter has waited
``starvation_s``, it may take ``starvation_share`` of the admissions ahead of higher lanes.
Nobody polls: waiters sleep on a condition, and the first one sleeps with a timeout computed
for the next instant anything may change (a bucket refilling, a hold ending). With an
injected clock other than the system clock, that timed wait is ``clock.sleep()``, so a fake
clock jumps straight there.

Options and the adaptive algorithm are documented in ``docs/plugins/limiter.md``; the
algorithm itself lives in :mod:`.adaptive`, the options and arithmetic in :mod:`.plan`, and
what the store keeps per lane and per attempt (and what an answer teaches a lane about tokens
and configured rates) in :mod:`._local_lanes`, the priority order of the waiters in
:mod:`._local_queue`.

Why this module is over 400 lines: :class:`AdmissionLimiter` is one state machine behind one
lock -- admission, the dispatch of waiters and release read and write the same slot counts,
buckets and queue, and a release dispatches at once -- so what is left here is that machine
and its protocol, nothing that stands on its own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Mapping, Optional, TypeVar

from cometkit import (
    AttemptResult,
    Clock,
    ConfigError,
    RateLimitError,
    RequestInfo,
    SystemClock,
    Throttle,
)

from ._local_lanes import Lane, Permit, Waiter, rate_bucket
from ._local_queue import WaitQueue
from .adaptive import AdaptiveControl
from .plan import (
    OPTIONS,
    PlanSettings,
    admission_timeout,
    charged_tokens,
    lane_cap,
    model_section,
    tokens_limited,
)

__all__ = ["AdmissionLimiter", "PLUGIN_NAME"]

logger = logging.getLogger("cometkit.limiter")

_T = TypeVar("_T")

#: The configuration section (and the name in messages) of this store.
PLUGIN_NAME = "limiter"

#: Longest single wait on a condition. Waiters are always notified when their turn may have
#: come; this only bounds the damage should a wake-up ever be lost.
_MAX_WAIT_S = 30.0
_EPSILON = 1e-9


# What blocks a waiter: the client's own limits (nobody behind it may pass) or its lane's
# (later calls of other models may).
_CLIENT = "client"
_LANE = "lane"


class AdmissionLimiter(PlanSettings):
    """Admits attempts under the configured limits and what adaptive mode learns.

    Implements :class:`cometkit.Limiter`. Thread-safe; one per client.

    :param max_concurrency: attempts in flight at once, all models together.
    :param requests_per_minute: client-wide request rate, or ``None``.
    :param tokens_per_minute: client-wide token rate, or ``None``.
    :param burst: seconds' worth of each rate the buckets hold.
    :param adaptive: learn from 429s and rate-limit headers (see
        :mod:`cometkit_plugins.limiting.adaptive`).
    :param safety_margin: share of the configured rates left unused.
    :param acquire_timeout: default seconds :meth:`acquire` waits before raising
        ``RateLimitError`` (``None``: no limit).
    :param starvation_share: share of admissions that may go to the oldest waiter of a lower
        priority lane ahead of higher ones, once it has waited ``starvation_s``.
    :param starvation_s: seconds a lower lane's call waits before it may overtake.
    :param models: per-model ``max_concurrency`` / ``requests_per_minute`` /
        ``tokens_per_minute``.
    :param clock: the clock to read and wait on.
    :raises ConfigError: a value out of range.
    """

    SCHEMA = OPTIONS
    PLUGIN = PLUGIN_NAME
    STORE = "AdmissionLimiter"
    DEFAULT_BURST = 1.0
    DEFAULT_SAFETY_MARGIN = 0.02

    def __init__(
        self,
        *,
        max_concurrency: Optional[int],
        requests_per_minute: Optional[float] = None,
        tokens_per_minute: Optional[float] = None,
        burst: float = DEFAULT_BURST,
        adaptive: bool = True,
        safety_margin: float = DEFAULT_SAFETY_MARGIN,
        acquire_timeout: Optional[float] = None,
        models: Optional[Mapping[str, Mapping[str, Any]]] = None,
        window: Optional[float] = None,
        window_align: str = "first_request",
        clock: Optional[Clock] = None,
        starvation_share: float = OPTIONS["starvation_share"].default,
        starvation_s: float = OPTIONS["starvation_s"].default,
    ) -> None:
        values = {
            "max_concurrency": max_concurrency, "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute, "burst": burst, "adaptive": adaptive,
            "safety_margin": safety_margin, "acquire_timeout": acquire_timeout,
            "models": dict(models or {}), "window": window, "window_align": window_align,
            "starvation_share": starvation_share, "starvation_s": starvation_s,
        }
        self._checked(values)
        if window is not None and requests_per_minute is None:
            raise ConfigError(f"{PLUGIN_NAME}.window: needs requests_per_minute (the window's "
                              "quota is requests_per_minute * window / 60)", key="window")
        self._keep_plan(values)
        self.window = window
        self.window_align = window_align
        self.starvation_share = float(starvation_share)
        self.starvation_s = float(starvation_s)
        self.clock: Clock = clock or SystemClock()
        # Condition waits measure real time; any other clock is waited on with its own sleep.
        self._real_time = self.clock.monotonic is time.monotonic
        now = self.clock.monotonic()
        # With a configured window the quota goes out together: the rate is the window's.
        self._requests = (None if window is not None else
                          rate_bucket(requests_per_minute, self.burst, self.safety_margin, now))
        self._tokens = rate_bucket(tokens_per_minute, self.burst, self.safety_margin, now)
        self._count_tokens = tokens_limited(tokens_per_minute, self.models)
        # A plain lock: nothing calls back in while it is held. (A stream abandoned to the
        # garbage collector does not release from its finalizer, which may run inside any
        # critical section: the core queues that release and makes it on a normal thread.)
        self._lock = threading.Lock()
        self._queue = WaitQueue(self.starvation_share, self.starvation_s)
        self._lanes: dict[Optional[str], Lane] = {}
        self._in_flight = 0
        self._closed = False

    def __repr__(self) -> str:
        return (f"AdmissionLimiter(max_concurrency={self.max_concurrency!r}, "
                f"requests_per_minute={self.requests_per_minute!r}, "
                f"tokens_per_minute={self.tokens_per_minute!r}, burst={self.burst!r}, "
                f"adaptive={self.adaptive!r}, models={sorted(self.models)!r})")

    # -- Limiter protocol ----------------------------------------------------------------------

    def acquire(self, request: RequestInfo, timeout_s: Optional[float] = None) -> Permit:
        """Wait, highest priority lane first and first come first served within a lane, until
        the attempt may go out; return its permit.

        :param timeout_s: longest wait (the time left of the call's deadline); the shorter of it
            and ``acquire_timeout`` applies, ``None`` leaves ``acquire_timeout`` alone.
        :raises RateLimitError: the wait would exceed the timeout.
        :raises RuntimeError: the limiter is (or gets) closed.
        """
        timeout = admission_timeout(self.acquire_timeout, timeout_s)
        with self._lock:
            waiter: Optional[Waiter] = None
            try:
                if self._closed:
                    raise RuntimeError("this limiter is closed")
                now = self.clock.monotonic()
                lane = self._lanes.get(request.model) or self._new_lane(request.model, now)
                priced = Waiter(lane, request)
                if not self._queue and self._blocked(lane, priced.cost, now)[0] is None:
                    return self._grant(lane, priced.parts, now)
                priced.cond = threading.Condition(self._lock)
                waiter = priced
                self._queue.enqueue(waiter)
                lane.waiting += 1
                lane.demand_changed(now)
                deadline = None if timeout is None else now + timeout
                return self._wait(waiter, request, deadline, timeout)
            finally:
                if waiter is not None and waiter.permit is None:  # timed out, closed, interrupted
                    now = self.clock.monotonic()
                    self._queue.remove(waiter)
                    waiter.lane.waiting -= 1
                    waiter.lane.demand_changed(now)
                    self._dispatch(now)

    def release(self, permit: Any, result: AttemptResult) -> Optional[Throttle]:
        """The attempt ended: free its slot, settle its tokens, learn from ``result``.

        :returns: for a 429 with adaptive mode on, the :class:`cometkit.Throttle` the retry
            policy reads (``accepting`` while the server keeps accepting other calls).
        """
        if not isinstance(permit, Permit):
            logger.debug("release() of something that is not a permit of this limiter: %r",
                         permit)
            return None
        with self._lock:
            return self._release(permit, result)

    def close(self) -> None:
        """Refuse new attempts and wake every waiter (each raises ``RuntimeError``)."""
        with self._lock:
            self._closed = True
            for waiter in list(self._queue):
                waiter.cond.notify()

    def with_control(self, model: Optional[str],
                     apply: Callable[[AdaptiveControl], _T]) -> Optional[_T]:
        """``apply(control)`` under the lock, on the adaptive control of ``model``'s lane (made
        if new): how a store that shares what a fleet learned (the Redis store) reads and
        feeds the one adaptive policy. ``None`` when adaptive mode is off."""
        with self._lock:
            now = self.clock.monotonic()
            lane = self._lanes.get(model) or self._new_lane(model, now)
            if lane.control is None:
                return None
            answer = apply(lane.control)
            if self._queue:  # what it took in may admit a waiter sooner
                self._dispatch(now)
            return answer

    # -- introspection -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Current state: slots in use, waiters, and per model what adaptive mode learned
        (``limit``, ``rate_per_s``, ``hold_remaining_s``, ``latency_s``, ``throttled``,
        ``signals``). Keys of ``models`` are model names (``None`` for calls without one)."""
        with self._lock:
            now = self.clock.monotonic()
            models = {}
            for model, lane in self._lanes.items():
                entry: dict[str, Any] = {"in_flight": lane.in_flight, "waiting": lane.waiting,
                                         "max_concurrency": lane.max_concurrency}
                if lane.token_ratio is not None:
                    entry["token_ratio"] = lane.token_ratio
                if lane.control is not None:
                    entry.update(lane.control.snapshot(now))
                else:
                    entry["limit"] = lane.max_concurrency
                models[model] = entry
            by_priority: dict[str, int] = {}
            for waiter in self._queue:
                name = waiter.request.priority
                by_priority[name] = by_priority.get(name, 0) + 1
            return {"in_flight": self._in_flight, "waiting": len(self._queue),
                    "waiting_by_priority": by_priority,
                    "max_concurrency": self.max_concurrency, "closed": self._closed,
                    "models": models}

    # -- internals (called with the lock held) -------------------------------------------------

    def _new_lane(self, model: Optional[str], now: float) -> Lane:
        section = model_section(self.models, model)
        cap = lane_cap(self.max_concurrency, self.models, model)
        requests = rate_bucket(section.get("requests_per_minute"), self.burst,
                                self.safety_margin, now)
        control = None
        if self.adaptive:
            # A configured rate is a floor adaptive learning does not undercut (until the
            # server keeps refusing at it); a configured window is known from the start.
            rates = [b.rate_per_s for b in (self._requests, requests) if b is not None]
            quota = None
            if self.window is not None and self.requests_per_minute is not None:
                quota = max(1, int(self.requests_per_minute * self.window / 60.0))
            control = AdaptiveControl(
                cap, now, rate_floor_per_s=min(rates) if rates else None,
                window_s=self.window, window_aligned=self.window_align == "clock",
                window_quota=quota, wall_offset=self.clock.time() - now)
        lane = Lane(
            model, cap, requests,
            rate_bucket(section.get("tokens_per_minute"), self.burst, self.safety_margin, now),
            control, self._count_tokens)
        self._lanes[model] = lane
        return lane

    def _blocked(self, lane: Lane, cost: int, now: float) -> tuple[Optional[str],
                                                                     Optional[float]]:
        """``(None, None)`` if an attempt of ``lane`` costing ``cost`` may go now, else who
        blocks it (:data:`_CLIENT` or :data:`_LANE`) and when that may change (``None``: only
        a release can change it)."""
        if self._in_flight >= self.max_concurrency:
            return _CLIENT, None
        ready = now
        if self._requests is not None:
            ready = self._requests.ready_at(1, now)
        if cost and self._tokens is not None:
            ready = max(ready, self._tokens.ready_at(cost, now))
        if ready - now > _EPSILON:
            return _CLIENT, ready
        if lane.in_flight >= lane.allowed():
            return _LANE, None
        if lane.control is not None:
            ready = max(ready, lane.control.ready_at(now))
            if math.isinf(ready):  # a probe is out: only its answer reopens the lane
                return _LANE, None
        if lane.requests is not None:
            ready = max(ready, lane.requests.ready_at(1, now))
        if cost:
            for bucket in (lane.tokens, lane.learned_tokens):
                if bucket is not None:
                    ready = max(ready, bucket.ready_at(cost, now))
        if ready - now > _EPSILON:
            return _LANE, ready
        return None, None

    def _grant(self, lane: Lane, parts: tuple[int, int, int], now: float) -> Permit:
        cost = parts[0]
        self._in_flight += 1
        lane.in_flight += 1
        for bucket in (self._requests, lane.requests):
            if bucket is not None:
                bucket.take(1, now)
        if cost:
            for bucket in (self._tokens, lane.tokens, lane.learned_tokens):
                if bucket is not None:
                    bucket.take(cost, now)
        probe = False
        if lane.control is not None:
            probe = lane.control.on_admit(now, cost)
            lane.demand_changed(now)
        lane.admitted += 1
        self._queue.admitted()
        return Permit(lane, cost, parts[1], parts[2], probe, lane.in_flight, lane.admitted)

    def _dispatch(self, now: float) -> Optional[float]:
        """Admit every waiter that may go now, highest lane and oldest first (a starving
        waiter of a lower lane ahead of them, see :meth:`.WaitQueue.starving`); return when to look
        again (``None``: not before a release). Wakes the first remaining waiter, which keeps
        time for everyone."""
        if self._closed:
            return None
        next_check: Optional[float] = None
        blocked_lanes: set[int] = set()
        order = list(self._queue)
        starving = self._queue.starving(now)
        if starving is not None:
            order.remove(starving)
            order.insert(0, starving)
        for waiter in order:
            lane = waiter.lane
            if id(lane) in blocked_lanes:
                continue  # an older call of this model is still waiting
            waiter.reprice()
            scope, ready = self._blocked(lane, waiter.cost, now)
            if ready is not None:
                next_check = ready if next_check is None else min(next_check, ready)
            if scope is None:
                self._queue.remove(waiter)
                lane.waiting -= 1
                waiter.permit = self._grant(lane, waiter.parts, now)
                if waiter is starving:
                    self._queue.overtook()
                waiter.cond.notify()
            elif scope is _CLIENT:
                break
            else:
                blocked_lanes.add(id(lane))
        if self._queue:
            self._queue[0].cond.notify()
        return next_check

    def _wait(self, waiter: Waiter, request: RequestInfo, deadline: Optional[float],
              timeout: Optional[float]) -> Permit:
        while True:
            now = self.clock.monotonic()
            next_check = self._dispatch(now)
            if waiter.permit is not None:  # admitted by this dispatch or an earlier one
                return waiter.permit
            if self._closed:
                raise RuntimeError("the limiter was closed while this attempt waited")
            if deadline is not None and now >= deadline:
                raise self._timeout_error(request, timeout)
            wake = deadline
            if next_check is not None and self._queue[0] is waiter:  # the timekeeper
                wake = next_check if wake is None else min(wake, next_check)
            if wake is None:
                waiter.cond.wait(_MAX_WAIT_S)
            elif self._real_time:
                waiter.cond.wait(min(_MAX_WAIT_S, max(0.0, wake - now)))
            else:
                self._lock.release()
                try:
                    self.clock.sleep(max(0.0, wake - now))
                finally:
                    self._lock.acquire()

    def _timeout_error(self, request: RequestInfo, timeout: Optional[float]) -> RateLimitError:
        lane = self._lanes.get(request.model)
        learned = ""
        if lane is not None and lane.control is not None:
            learned = f", allowed concurrency {lane.allowed()}"
            if lane.control.rate_per_s is not None:
                learned += f", send rate {lane.control.rate_per_s:.2f}/s"
        return RateLimitError(
            f"the limiter did not admit {request.method} {request.route} "
            f"model={request.model or '-'} within acquire_timeout={timeout:g} s "
            f"({self._in_flight} in flight, {len(self._queue)} waiting{learned})",
            status_code=429)

    def _release(self, permit: Permit, result: AttemptResult) -> Optional[Throttle]:
        if permit.released:
            logger.debug("permit released twice: %r", permit)
            return None
        permit.released = True
        now = self.clock.monotonic()
        lane = permit.lane
        self._in_flight -= 1
        lane.in_flight -= 1
        verdict = None
        control = lane.control
        if control is not None:
            hints = result.hints
            if hints is not None and result.status_code is not None:
                lane.learn_stated_limits(permit, result.accepted, hints, now, self.safety_margin)
            signals = control.signals
            charged = charged_tokens(result, permit.answer_reserved) or 0
            kind = control.on_result(result, now, self.clock.time, probe=permit.probe,
                                     in_flight=permit.level, charged_tokens=charged,
                                     window_rank=permit.window_rank)
            lane.demand_changed(now)
            if control.token_rate_per_s is not None:
                lane.follow_token_rate(control.token_rate_per_s, self.burst, now)
            if kind == "tokens":
                lane.count_tokens = True
            if kind is not None:
                if kind in ("rate", "tokens") and control.signals > signals:
                    lane.refused_at_configured_rate(self._requests)
                # A spent quota is no limit to wait for in the queue: the retry policy's
                # own rules (and budget) decide, should it be told to retry quota errors.
                verdict = Throttle(control.accepting(now) and kind != "quota", kind,
                                   control.hold_remaining_s(now))
        if lane.count_tokens:
            lane.settle_tokens(permit, result, now, self._tokens)
        if self._queue:
            self._dispatch(now)
        return verdict
