"""The Redis store of the limiting plan: :class:`RedisLimiter`, one admission limit shared by
every process and host that uses an API key.

The in-process ``limiter`` sees only its own process's traffic; a provider's limit is one
number for every gunicorn or Celery worker on every host. This store keeps the state in Redis
instead, with the ``limiter``'s options (plus where Redis is and what to do when it is not):

- **Concurrency** is a set of *leases* (:mod:`._redis_leases`): a sorted set per scope (the
  client, each model) of permit ids scored by their expiry. Acquiring reaps expired leases,
  then adds one if the set holds fewer than the limit; releasing removes it; a background
  thread renews the leases of attempts still running.
- **Rates** (``requests_per_minute``, ``tokens_per_minute``, per client and per model) are GCRA:
  one key per limit holding a *theoretical arrival time*, charged once per attempt with a
  weight (1 request, or the token estimate), so no per-token or per-request entries pile up.
  It is the ``limiter``'s token bucket (``burst`` seconds' worth, less ``safety_margin``) in
  one number; the token estimate is corrected from ``usage`` on release.
- **Adaptive** mode is shared per model: a 429 seen by any process sets a *hold* key for as
  long as the adaptive policy holds that process (every process waits it out before
  admitting), and cuts the model's shared concurrency limit multiplicatively -- once per
  burst: a 429 for an attempt admitted before the last cut is an echo of it. Successes grow
  the limit back by one per window (slow start until the first cut), as the in-process
  limiter does. What the policy learns is the fleet's (:mod:`._fleet_learning`).
- **Priority lanes** are ordered across the fleet (:mod:`.fleet_lanes`).

Every change of state is one Lua script (:mod:`._redis_scripts`, the files in ``lua/``),
atomic in Redis and timed by Redis' own ``TIME``, so the hosts' clocks need not agree. Keys
are ``<key_prefix>:<sha256 of the API key, 16 hex digits>:...``: never the key itself.

The admission itself, and how a refused attempt waits, is :mod:`._redis_admission`; this
class picks Redis or the fallback and pairs each lease with the pacer's permit. Admission
across processes is not first come, first served.

When Redis cannot be reached, ``on_redis_error`` decides (:mod:`._redis_fallback`). Socket
timeouts bound every Redis call, so a dead Redis never hangs a call.

Needs the ``redis`` extra (``pip install 'cometkit[redis]'``); the library is imported only
when a client enables the plugin (:mod:`._redis_config`). Documented in
``docs/deployment.md``.
"""

from __future__ import annotations

import logging
import os
import threading
from random import Random
from typing import Any, Mapping, Optional

from cometkit import AttemptResult, Clock, RequestInfo, SystemClock, Throttle

from ._fleet_learning import FleetLearning, decoded
from ._redis_admission import CONTROL_TTL_S, SharedAdmission
from ._redis_config import (
    DEFAULT_URL,
    OPTIONS,
    PLUGIN_NAME,
    connect,
    import_redis,
    resolve_url,
    shown_url,
)
from ._redis_fallback import OPEN, RECONNECT_INTERVAL_S, LocalPermit, RedisFallback
from ._redis_lanes import RedisPermit, lane_scope
from ._redis_leases import LeaseKeeper
from ._redis_scripts import LANE_GATE_LUA, LANE_LEAVE_LUA, RENEW_LUA
from .adaptive import INITIAL_LIMIT
from .local import AdmissionLimiter
from .plan import OPTIONS as LIMITER_OPTIONS
from .plan import PlanSettings, admission_timeout, tokens_limited

__all__ = [
    "RedisLimiter",
    "OPTIONS",
    "DEFAULT_URL",
    "PLUGIN_NAME",
    "resolve_url",
    "shown_url",
    "lane_scope",
    "LANE_GATE_LUA",
    "LANE_LEAVE_LUA",
]

logger = logging.getLogger("cometkit.redis_limiter")


class RedisLimiter(PlanSettings):
    """Admits attempts under limits shared through Redis by every client with the same API
    key, ``key_prefix`` and Redis. Implements :class:`cometkit.Limiter`; thread-safe.

    :param url: Redis URL; ``None`` means ``$REDIS_URL`` or :data:`DEFAULT_URL`.
    :param key_prefix: first part of every key.
    :param namespace: second part: the client's ``api_key_fingerprint``.
    :param lease_ttl: seconds a slot stays taken without renewal.
    :param on_redis_error: ``local``, ``fail_open`` or ``fail_closed``.
    :param socket_timeout: seconds for any one Redis connect or command.
    :param reconnect_interval_s: while Redis is unreachable, seconds between tries.
    :param clock: the clock waits are timed and slept on (Redis times the limits).
    :param rng: randomness for the polling jitter.
    :param redis_client: a ready ``redis.Redis`` to use instead of one built from ``url``
        (its timeouts are then the caller's business).

    The other keywords are the ``limiter``'s (see
    :class:`cometkit_plugins.limiter.AdmissionLimiter`); ``max_concurrency`` is required here.
    :raises ConfigError: a value out of range.
    :raises PluginError: the ``redis`` package is not installed.
    """

    SCHEMA = OPTIONS
    PLUGIN = PLUGIN_NAME
    STORE = "RedisLimiter"

    def __init__(
        self,
        *,
        max_concurrency: Optional[int],
        url: Optional[str] = None,
        key_prefix: str = "cometkit",
        namespace: str = "",
        lease_ttl: float = 30.0,
        on_redis_error: str = "local",
        socket_timeout: float = 0.5,
        requests_per_minute: Optional[float] = None,
        tokens_per_minute: Optional[float] = None,
        burst: float = AdmissionLimiter.DEFAULT_BURST,
        adaptive: bool = True,
        safety_margin: float = AdmissionLimiter.DEFAULT_SAFETY_MARGIN,
        acquire_timeout: Optional[float] = None,
        models: Optional[Mapping[str, Mapping[str, Any]]] = None,
        reconnect_interval_s: float = RECONNECT_INTERVAL_S,
        clock: Optional[Clock] = None,
        rng: Optional[Random] = None,
        redis_client: Any = None,
        starvation_share: float = LIMITER_OPTIONS["starvation_share"].default,
        starvation_s: float = LIMITER_OPTIONS["starvation_s"].default,
    ) -> None:
        values = {
            "max_concurrency": max_concurrency, "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute, "burst": burst, "adaptive": adaptive,
            "safety_margin": safety_margin, "acquire_timeout": acquire_timeout,
            "models": dict(models or {}), "url": url, "key_prefix": key_prefix,
            "lease_ttl": lease_ttl, "on_redis_error": on_redis_error,
            "socket_timeout": socket_timeout,
            "starvation_share": starvation_share, "starvation_s": starvation_s,
        }
        self.options = self._checked(values)
        self._keep_plan(values)
        redis = import_redis()
        # What a dead or stuck Redis raises (redis-py wraps most socket errors, not all).
        self._redis_error: tuple = (redis.RedisError, OSError)
        self.url = resolve_url(url)
        self.url_shown = shown_url(self.url)
        self.key_prefix = key_prefix
        self.namespace = namespace or "nokey"
        self.base_key = f"{key_prefix}:{self.namespace}"
        self.lease_ttl = float(lease_ttl)
        self.on_redis_error = on_redis_error
        self.socket_timeout = float(socket_timeout)
        self.reconnect_interval_s = float(reconnect_interval_s)
        self.clock: Clock = clock or SystemClock()
        self.random = rng or Random()
        if redis_client is None:
            redis_client = connect(redis, self.url, self.socket_timeout)
        self._redis = redis_client
        # Adaptive mode may learn a token rate the fleet then spends at: tokens are counted.
        # Adaptive mode learns the fleet's token rate from the counted tokens of every call.
        count_tokens = self.adaptive or tokens_limited(tokens_per_minute, self.models)
        self._count_tokens = count_tokens
        self._closing = threading.Event()
        self._closed = False
        self._pid = os.getpid()
        self._fallback = RedisFallback(
            redis_client, self._redis_error, mode=on_redis_error, options=self.options,
            max_concurrency=self.max_concurrency,
            reconnect_interval_s=self.reconnect_interval_s, clock=self.clock,
            url_shown=self.url_shown)
        self._leases = LeaseKeeper(
            redis_client.register_script(RENEW_LUA), f"{self.base_key}:all:slots",
            self.lease_ttl, self._fallback, self._closing,
            name=f"cometkit-redis-leases-{self.namespace}")
        # Adaptive mode is the in-process limiter's policy (send rate, token rate, holds,
        # probes, windows, caps on calls in flight), one control per model in this process,
        # fed what the whole fleet sent and had accepted: what it learns is the fleet's, and
        # is shared through Redis (see FleetLearning), where the learned rates are enforced
        # fleet-wide.
        pacer: Optional[AdmissionLimiter] = (
            AdmissionLimiter(max_concurrency=self.max_concurrency, burst=self.burst,
                             safety_margin=self.safety_margin, clock=self.clock,
                             starvation_share=starvation_share, starvation_s=starvation_s)
            if self.adaptive else None)
        self._learning = FleetLearning(pacer, redis_client, self._fallback, burst=self.burst,
                                       control_ttl_ms=int(CONTROL_TTL_S * 1000))
        self._admission = SharedAdmission(
            redis_client, self.base_key, {
                "max_concurrency": self.max_concurrency,
                "requests_per_minute": requests_per_minute,
                "tokens_per_minute": tokens_per_minute, "burst": self.burst,
                "safety_margin": self.safety_margin, "adaptive": self.adaptive,
                "models": self.models, "starvation_share": starvation_share,
                "starvation_s": starvation_s},
            count_tokens=count_tokens, reachability=self._fallback, leases=self._leases,
            learning=self._learning, clock=self.clock, rng=self.random, closing=self._closing,
            url_shown=self.url_shown)

    def __repr__(self) -> str:
        return (f"RedisLimiter({self.url_shown!r}, key={self.base_key!r}, "
                f"max_concurrency={self.max_concurrency!r}, "
                f"requests_per_minute={self.requests_per_minute!r}, "
                f"tokens_per_minute={self.tokens_per_minute!r}, adaptive={self.adaptive!r}, "
                f"on_redis_error={self.on_redis_error!r})")

    # -- Limiter protocol ----------------------------------------------------------------------

    def acquire(self, request: RequestInfo, timeout_s: Optional[float] = None) -> Any:
        """Wait until the attempt may go out under the shared limits; return its permit.

        :param timeout_s: longest wait (the time left of the call's deadline); the shorter of it
            and ``acquire_timeout`` applies, ``None`` leaves ``acquire_timeout`` alone.
        :raises RateLimitError: the wait would exceed the timeout, or Redis is unreachable
            with ``on_redis_error: fail_closed``.
        :raises RuntimeError: the limiter is (or gets) closed.
        """
        if self._closed:
            raise RuntimeError("this limiter is closed")
        self._after_fork()
        prompt, answer = request.token_estimate if self._count_tokens else (0, 0)
        cost = prompt + answer
        timeout = admission_timeout(self.acquire_timeout, timeout_s)
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        if self._fallback.usable():
            pacer = self._learning.pacer
            paced = None
            if pacer is not None:
                remaining = None if deadline is None else max(0.0, deadline -
                                                              self.clock.monotonic())
                paced = pacer.acquire(request, remaining)
            try:
                permit = self._admission.acquire(request, cost, deadline, timeout)
            except BaseException as exc:
                if paced is not None:  # not sent: the pacer learns nothing from it
                    pacer.release(paced, AttemptResult(request, 0, error=exc))
                if not isinstance(exc, self._redis_error):
                    raise
                self._fallback.went_down(exc)
            else:
                if paced is not None:  # a cap on calls in flight counts the fleet's ...
                    paced.level = max(paced.level, permit.fleet_level)
                    paced.window_rank = permit.window_rank  # ... and so does a window
                permit.paced = paced
                permit.answer_reserved = answer
                return permit
        return self._fallback.acquire(request, deadline)

    def release(self, permit: Any, result: AttemptResult) -> Optional[Throttle]:
        """The attempt ended: give its slot back, settle its tokens, share what a 429 says.

        :returns: for a 429 in adaptive mode, a :class:`cometkit.Throttle` that is
            ``accepting`` while *any* process of the fleet saw this model accepted within
            the storm horizon: the refused call waits out the shared hold instead of spending
            its attempts.
        """
        if isinstance(permit, LocalPermit):
            return self._fallback.release(permit, result)
        if not isinstance(permit, RedisPermit):
            if permit is not OPEN:
                logger.debug("release() of something that is not a permit of this limiter: %r",
                             permit)
            return None
        return self._release(permit, result)

    def close(self) -> None:
        """Refuse new attempts and stop renewing leases (attempts in flight still release)."""
        self._closed = True
        self._closing.set()
        self._leases.join(timeout=2 * self.socket_timeout + 1.0)
        for limiter in (self._fallback.local, self._learning.pacer):
            if limiter is not None:
                limiter.close()

    # -- introspection -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Current state: ``backend`` (``redis``, or while Redis is unreachable the
        ``on_redis_error`` mode), ``held`` (leases of this process), ``in_flight`` (leases of
        the whole fleet, ``None`` when Redis does not answer), ``max_concurrency``, and under
        ``models`` each lane this process used: fleet ``in_flight``, shared ``limit``,
        ``hold_remaining_s``, ``learned`` (what the fleet learned: ``rate_per_s``,
        ``token_rate_per_s``, ``window_s``, ``window_aligned``, ``window_quota``, ``ceiling``,
        each present once a process learned it) and, in adaptive mode, ``process``: what this
        process's adaptive policy holds now (its ``limit``, the ``rate_per_s`` and
        ``token_rate_per_s`` it sends at -- the learned ones, grown since --, ``window_s``,
        ``window_quota``, ``ceiling``, as the in-process limiter's ``stats()`` shows them)."""
        held = len(self._leases)
        lanes = self._admission.lanes()
        down = self._fallback.down
        out: dict[str, Any] = {
            "backend": "redis" if not down else self.on_redis_error,
            "held": held, "in_flight": None, "max_concurrency": self.max_concurrency,
            "closed": self._closed, "models": {},
        }
        if down:
            return out
        try:
            seconds, micros = self._redis.time()
            now_ms = seconds * 1000 + micros / 1000
            pipe = self._redis.pipeline(transaction=False)
            pipe.zcount(self._admission.client_slots, now_ms, "+inf")
            for lane in lanes:
                pipe.zcount(lane.slots, now_ms, "+inf")
                pipe.hget(lane.control, "limit")
                pipe.pttl(lane.hold)
                pipe.hgetall(lane.learned)
            values = pipe.execute()
        except self._redis_error as exc:
            self._fallback.went_down(exc)
            out["backend"] = self.on_redis_error
            return out
        out["in_flight"] = values[0]
        for index, lane in enumerate(lanes):
            in_flight, limit, hold_ms, learned = values[1 + 4 * index: 5 + 4 * index]
            allowed = self._admission.lane_cap(lane.model)
            if self.adaptive:
                shared = float(limit) if limit is not None else float(INITIAL_LIMIT)
                allowed = min(allowed, max(1, int(shared)))
            entry = out["models"][lane.model] = {
                "in_flight": in_flight, "limit": allowed,
                "hold_remaining_s": max(0, hold_ms) / 1000.0, "learned": decoded(learned)}
            if self._learning.pacer is not None:
                entry["process"] = self._learning.snapshot(lane)
        return out

    # -- admission ------------------------------------------------------------------------------

    def _release(self, permit: RedisPermit, result: AttemptResult) -> Optional[Throttle]:
        if not self._leases.drop(permit):
            logger.debug("permit released twice: %r", permit)
            return None
        pacer = self._learning.pacer
        local = None
        if permit.paced is not None and pacer is not None:
            local = pacer.release(permit.paced, result)
        try:
            return self._admission.release(permit, result, local)
        finally:
            self._learning.idle(permit.lane)

    def _after_fork(self) -> None:
        """In a forked child (gunicorn --preload): the parent's leases and renewal thread are
        not this process's, nor are locks its other threads held; redis-py reconnects by
        itself."""
        pid = os.getpid()
        if pid == self._pid:
            return
        self._pid = pid
        self._admission.after_fork()
        self._fallback.after_fork()
        self._learning.after_fork()
        self._leases.after_fork()
