"""The Redis store's admission itself: taking and giving back a lease through the Lua scripts.

:class:`SharedAdmission` runs ``acquire.lua`` until an attempt is admitted under every shared
limit (the client's and its model's slots and rates, the shared hold, the fleet's learned
rates, a known window), in its turn among the fleet's priority lanes (:mod:`.fleet_lanes`),
and ``release.lua`` when it ends (the lease given back, its tokens settled, an acceptance
counted, a 429 shared as a hold and a cut of the shared concurrency). Waiting does not spin: a
refused attempt sleeps for the exact time Redis says (a hold, a rate) or, when it waits for a
slot another process holds, polls with a backoff from 5 to 50 ms (with jitter). Which of Redis
or the fallback admits, and the in-process pacer, are :class:`.redis_store.RedisLimiter`'s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from random import Random
from typing import Any, Mapping, Optional

from cometkit import AttemptResult, Clock, RateLimitError, RequestInfo, Throttle

from ._fleet_learning import FleetLearning
from ._redis_fallback import RedisFallback
from ._redis_lanes import RedisLane, RedisPermit, gcra, lane_scope
from ._redis_leases import LeaseKeeper
from ._redis_scripts import ACQUIRE_LUA, LANE_GATE_LUA, LANE_LEAVE_LUA, RELEASE_LUA, text
from .adaptive import CONCURRENCY_BACKOFF, INITIAL_LIMIT, STORM_HORIZON_S
from .fleet_lanes import OVERTAKE, WAIT, FleetLanes, FleetWaiter
from .plan import charged_tokens, lane_cap, model_section, token_refund

__all__ = ["SharedAdmission", "CONTROL_TTL_S"]

logger = logging.getLogger("cometkit.redis_limiter")

#: Shortest and longest sleep between two tries while waiting for a slot held elsewhere.
POLL_MIN_S = 0.005
POLL_MAX_S = 0.05
#: Longest single sleep on a wait Redis computed (a rate, a hold): look again at least this
#: often, so a change of picture (a refund, a closed client) is noticed.
MAX_SLEEP_S = 1.0

#: A model's shared adaptive state is forgotten after this long without an answer.
CONTROL_TTL_S = 3600.0

#: What a refused attempt was waiting for, by the acquire script's reason, for messages.
_WAITING_FOR = {"hold": "a shared hold after a 429", "rate": "a shared rate limit",
                "pace": "the fleet's learned send or token rate",
                "window": "the fleet's quota of a window to open",
                "slots": "a shared concurrency slot",
                "lane": "calls of a higher priority lane"}


class SharedAdmission:
    """Admits attempts through Redis and takes their leases back.

    :param redis: the ``redis.Redis`` client the scripts are registered with.
    :param base_key: the first two parts of every key (``key_prefix`` and the API key's hash).
    :param limits: the store's plan settings: ``max_concurrency`` (a number),
        ``requests_per_minute``, ``tokens_per_minute``, ``burst``, ``safety_margin``,
        ``adaptive``, ``models``, ``starvation_share``, ``starvation_s``.
    :param count_tokens: whether attempts are charged their token estimate.
    :param reachability: whether Redis answers.
    :param leases: the leases of this process's running attempts.
    :param learning: what the fleet learned, to publish and take in with every script.
    :param clock: the clock waits are timed and slept on.
    :param rng: randomness for the polling jitter.
    :param closing: set when the limiter closes: waits end with ``RuntimeError``.
    :param url_shown: the Redis URL for messages, without credentials.
    """

    def __init__(self, redis: Any, base_key: str, limits: Mapping[str, Any], *,
                 count_tokens: bool, reachability: RedisFallback, leases: LeaseKeeper,
                 learning: FleetLearning, clock: Clock, rng: Random,
                 closing: threading.Event, url_shown: str) -> None:
        self.base_key = base_key
        self.max_concurrency: int = limits["max_concurrency"]
        self.models: Mapping[str, Mapping[str, Any]] = limits["models"]
        self.burst: float = limits["burst"]
        self.safety_margin: float = limits["safety_margin"]
        self.adaptive: bool = limits["adaptive"]
        self._count_tokens = count_tokens
        self._reachability = reachability
        self._errors = reachability.errors
        self._leases = leases
        self._learning = learning
        self.clock = clock
        self.random = rng
        self._closing = closing
        self._real_time = clock.sleep is time.sleep
        self._url_shown = url_shown
        self._acquire_script = redis.register_script(ACQUIRE_LUA)
        self._release_script = redis.register_script(RELEASE_LUA)
        self.client_slots = f"{base_key}:all:slots"
        self._client_rpm = f"{base_key}:all:rpm"
        self._client_tpm = f"{base_key}:all:tpm"
        self._client_rpm_gcra = gcra(limits["requests_per_minute"], self.burst,
                                     self.safety_margin)
        self._client_tpm_gcra = gcra(limits["tokens_per_minute"], self.burst,
                                     self.safety_margin)
        self._control_ttl_ms = int(CONTROL_TTL_S * 1000)
        self._fleet_lanes = FleetLanes(
            redis.register_script(LANE_GATE_LUA), redis.register_script(LANE_LEAVE_LUA),
            starvation_share=limits["starvation_share"], starvation_s=limits["starvation_s"],
            clock=clock)
        self._lanes: dict[Optional[str], RedisLane] = {}
        self._lock = threading.Lock()

    def lanes(self) -> list[RedisLane]:
        """The lanes this process used so far."""
        with self._lock:
            return list(self._lanes.values())

    def lane_cap(self, model: Optional[str]) -> int:
        return lane_cap(self.max_concurrency, self.models, model)

    def after_fork(self) -> None:
        """In a forked child: a lock another thread of the parent held stays held; a new one."""
        self._lock = threading.Lock()

    # -- acquire -------------------------------------------------------------------------------

    def _lane(self, model: Optional[str]) -> RedisLane:
        with self._lock:
            lane = self._lanes.get(model)
            if lane is None:
                section = model_section(self.models, model)
                own_cap = section.get("max_concurrency") is not None
                lane = RedisLane(
                    self.base_key, model,
                    self.lane_cap(model) if (self.adaptive or own_cap) else 0,
                    gcra(section.get("requests_per_minute"), self.burst, self.safety_margin),
                    gcra(section.get("tokens_per_minute"), self.burst, self.safety_margin))
                self._lanes[model] = lane
            return lane

    def acquire(self, request: RequestInfo, cost: int, deadline: Optional[float],
                        timeout: Optional[float]) -> RedisPermit:
        lane = self._lane(request.model)
        permit_id = f"{os.getpid()}-{uuid.uuid4().hex[:16]}"
        keys = [self.client_slots, self._client_rpm, self._client_tpm, lane.slots, lane.rpm,
                lane.tpm, lane.hold, lane.control, lane.pace, lane.learned_tpm, lane.learned,
                lane.window]
        head = [permit_id, self._leases.lease_ms, self.max_concurrency, *self._client_rpm_gcra,
                *self._client_tpm_gcra, lane.max_concurrency, *lane.rpm_gcra, *lane.tpm_gcra,
                cost, 1 if self.adaptive else 0, min(lane.max_concurrency or 1, INITIAL_LIMIT)]
        backoff = POLL_MIN_S
        waiter = self._fleet_lanes.waiter(FleetLanes.keys(
            lane_scope(self.base_key, lane.model), f"{self.base_key}:all"), permit_id, request)
        learning = self._learning
        learning.busy(lane)
        granted = False
        try:
            if not lane.introduced:
                learning.introduce(lane)
            while True:
                turn = self._lane_turn(waiter, deadline, timeout)
                news, pace, token_pace, limits = learning.share(lane)
                known = learning.version(lane)
                reply = self._acquire_script(keys=keys, args=[
                    *head, pace, *token_pace, known, self._control_ttl_ms, *limits, *news])
                granted = reply[0] == 1
                value, detail = reply[1], reply[2]
                learning.take_in(lane, reply[5:], (1, 0, cost, 0) if granted else (0, 0, 0, 0))
                if granted:
                    self._leave_lane(waiter, admitted=True, overtook=turn == OVERTAKE)
                    permit = RedisPermit(permit_id, lane, cost, text(value),
                                         learned_tpm_interval=token_pace[0],
                                         fleet_level=int(reply[3]), window_rank=int(reply[4]))
                    self._leases.hold(permit)
                    return permit
                waiter.held_up(self._client_wide(lane, text(detail)))
                now = self.clock.monotonic()
                if deadline is not None and now >= deadline:
                    raise self._timeout_error(request, timeout, text(detail))
                if value >= 0 and not (text(detail) == "window"
                                       and learning.quota_open(lane)):
                    # Redis knows when: a hold ending, a rate refilling, a window opening
                    self._wait(min(MAX_SLEEP_S, value / 1000.0), deadline, now)
                else:  # a slot held elsewhere: poll, backing off, with jitter
                    backoff = self._poll(backoff, deadline, now)
        finally:
            if not granted:
                learning.idle(lane)
                self._leave_lane(waiter)

    @staticmethod
    def _client_wide(lane: RedisLane, reason: str) -> bool:
        """Whether a refusal for ``reason`` was by a limit every model shares: a rate when
        the model has none of its own, slots when it has no slots of its own."""
        if reason == "rate":
            return not lane.rpm_gcra[0] and not lane.tpm_gcra[0]
        return reason == "slots" and not lane.max_concurrency

    def _lane_turn(self, waiter: FleetWaiter, deadline: Optional[float],
                   timeout: Optional[float]) -> int:
        """Wait until no higher priority lane waits anywhere in the fleet (or this call may
        overtake them, see :mod:`.fleet_lanes`): :data:`GO` or :data:`OVERTAKE`."""
        backoff = POLL_MIN_S
        while True:
            turn = waiter.turn()
            if turn != WAIT:
                return turn
            now = self.clock.monotonic()
            if deadline is not None and now >= deadline:
                raise self._timeout_error(waiter.request, timeout, "lane")
            backoff = self._poll(backoff, deadline, now)

    def _leave_lane(self, waiter: FleetWaiter, *, admitted: bool = False,
                    overtook: bool = False) -> None:
        """A waiter leaves the fleet's queues, admitted or giving up. Should Redis not answer
        now, its heartbeat expires instead: an admitted attempt keeps its lease."""
        try:
            waiter.leave(admitted=admitted, overtook=overtook)
        except self._errors as exc:
            logger.debug("could not leave the fleet's queue of waiters: %s", exc)

    # -- release -------------------------------------------------------------------------------

    def release(self, permit: RedisPermit, result: AttemptResult,
                        local: Optional[Throttle]) -> Optional[Throttle]:
        """Give the lease back, settle its tokens, and tell the fleet what the answer was: an
        acceptance (counted, and the shared concurrency grows), or a refusal, which holds
        every process for as long as the adaptive policy holds this one and cuts the shared
        concurrency once per burst."""
        if self._reachability.down:
            return local  # Redis is unreachable: the lease runs out by itself within lease_ttl
        lane = permit.lane
        refund = 0
        if self._count_tokens:
            refund = token_refund(permit.cost, result, permit.answer_reserved) or 0
        charged = 0
        outcome, hold_s = "", 0.0
        if self.adaptive and result.status_code is not None:
            if result.status_code == 429:
                # A spent quota holds nothing; a cap on calls in flight neither holds nor
                # cuts: the ceiling it taught keeps the fleet below it.
                if local is not None and local.kind not in ("quota", "concurrency"):
                    outcome, hold_s = "429", self._learning.held_for(lane)
            elif result.accepted:
                outcome = "ok"
                charged = charged_tokens(result, permit.answer_reserved) or 0
        try:
            reply = self._release_script(
                keys=[self.client_slots, lane.slots, self._client_tpm, lane.tpm, lane.hold,
                      lane.control, lane.learned_tpm],
                args=[permit.id, refund, self._client_tpm_gcra[0], lane.tpm_gcra[0],
                      permit.learned_tpm_interval, outcome, int(round(hold_s * 1000)),
                      permit.admitted_at, lane.max_concurrency,
                      min(lane.max_concurrency or 1, INITIAL_LIMIT), CONCURRENCY_BACKOFF,
                      self._control_ttl_ms, charged])
        except self._errors as exc:
            self._reachability.went_down(exc)
            return local
        _held, limit, cut, ok_age_ms = reply[:4]
        self._learning.take_in(lane, reply[4:],
                               (0, 1, 0, charged) if outcome == "ok" else (0, 0, 0, 0))
        if cut == 1:
            logger.info("429 for model=%s: shared concurrency now %d, holding admissions "
                        "%.2f s in every process", lane.label, max(1, int(float(limit))),
                        hold_s)
        if result.status_code != 429 or not self.adaptive:
            if outcome == "ok" and permit.window_rank:
                # An accepted rank may have raised a quota still open (a probe of one
                # more): the fleet's waiters poll for it, so tell them now.
                self._learning.publish(lane)
            return local
        self._learning.publish(lane)
        age_s = float(text(ok_age_ms)) / 1000.0
        fleet_accepting = 0 <= age_s <= STORM_HORIZON_S
        if local is not None:
            return Throttle((local.accepting or fleet_accepting) and local.kind != "quota",
                            local.kind, local.wait_s)
        return Throttle(fleet_accepting, "rate", None)

    # -- waiting -------------------------------------------------------------------------------

    def _timeout_error(self, request: RequestInfo, timeout: Optional[float],
                       reason: str) -> RateLimitError:
        waiting_for = _WAITING_FOR.get(reason, reason)
        return RateLimitError(
            f"redis_limiter did not admit {request.method} {request.route} "
            f"model={request.model or '-'} within acquire_timeout={timeout:g} s "
            f"(waiting for {waiting_for}; Redis {self._url_shown}, key {self.base_key})",
            status_code=429)

    def _poll(self, backoff: float, deadline: Optional[float], now: float) -> float:
        """Wait one poll for something only another process can free (a slot, a higher
        lane's turn): ``backoff`` with jitter, within the deadline; the next backoff."""
        self._wait(min(POLL_MAX_S, backoff * self.random.uniform(1.0, 1.5)), deadline, now)
        return min(POLL_MAX_S, backoff * 2)

    def _wait(self, seconds: float, deadline: Optional[float], now: float) -> None:
        """Sleep ``seconds`` (never past ``deadline``), unless the limiter closes meanwhile."""
        if deadline is not None:
            seconds = min(seconds, deadline - now)
        self._sleep(max(0.0, seconds))
        if self._closing.is_set():
            raise RuntimeError("the limiter was closed while this attempt waited")

    def _sleep(self, seconds: float) -> None:
        if self._real_time:
            self._closing.wait(seconds)  # close() cuts the wait short
        else:
            self.clock.sleep(seconds)
