"""The Redis store of the limiting plan: :class:`RedisLimiter`, one admission limit shared by
every process and host that uses an API key.

The in-process ``limiter`` sees only its own process's traffic; a provider's limit is one
number for every gunicorn or Celery worker on every host. This plugin keeps the state in Redis
instead, with the ``limiter``'s options (plus where Redis is and what to do when it is not):

- **Concurrency** is a set of *leases*: a sorted set per scope (the client, each model) whose
  members are permit ids scored by their expiry. Acquiring reaps expired leases, then adds one
  if the set holds fewer than the limit; releasing removes it. A background thread renews the
  leases of attempts still running every ``lease_ttl / 3``, so a process killed with SIGKILL
  loses its slots within ``lease_ttl`` while a long call keeps its own.
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
  limiter does.
- **What adaptive mode learns is the fleet's**: each process runs the one adaptive policy
  (:mod:`.adaptive`, in an in-process ``AdmissionLimiter`` per process), told by every script
  answer what the rest of the fleet sent and had accepted meanwhile, so the rates it learns
  are the rates the server gives the fleet. What it learns is published to a ``learned`` hash
  with its next acquire, taken in by every other process with theirs (and read once by a
  process that joins), and the learned send and token rates are enforced in Redis for every
  process together. This store keeps and passes on; the learning rules stay in the policy.

Every change of state is one Lua script (``EVALSHA``), atomic in Redis and timed by Redis'
own ``TIME``, so the hosts' clocks need not agree. Keys are ``<key_prefix>:<sha256 of the API
key, 16 hex digits>:...``: never the key itself.

Waiting does not spin: a refused attempt sleeps for the exact time Redis says (a hold, a rate)
or, when it waits for a slot another process holds, polls with a backoff from 5 to 50 ms
(with jitter). Admission across processes is not first come, first served.

When Redis cannot be reached (``on_redis_error``) attempts fall back to an in-process
``AdmissionLimiter`` built from the same options (``local``, the default), go out unlimited
(``fail_open``) or fail with ``RateLimitError`` (``fail_closed``); Redis is tried again every
few seconds. Socket timeouts bound every Redis call, so a dead Redis never hangs a call.

Needs the ``redis`` extra (``pip install 'cometkit[redis]'``); the library is imported only
when a client enables the plugin. Documented in ``docs/deployment.md``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from importlib import resources
from random import Random
from typing import Any, Mapping, Optional
from urllib.parse import quote, urlsplit

from cometkit import (
    AttemptResult,
    Clock,
    Option,
    PluginError,
    RateLimitError,
    RequestInfo,
    SystemClock,
    Throttle,
)
from cometkit.options import validate_section

from .adaptive import (
    CONCURRENCY_BACKOFF,
    INITIAL_LIMIT,
    STORM_HORIZON_S,
    WINDOW_SLACK_S,
    AdaptiveControl,
)
from .fleet_lanes import OVERTAKE, WAIT, FleetLanes, FleetWaiter
from .local import AdmissionLimiter
from .plan import OPTIONS as LIMITER_OPTIONS
from .plan import (
    admission_timeout,
    charged_tokens,
    concurrency_number,
    factory_kwargs,
    lane_cap,
    paced_rate,
    token_refund,
    tokens_limited,
)

__all__ = [
    "RedisLimiter",
    "OPTIONS",
    "DEFAULT_URL",
]

logger = logging.getLogger("cometkit.redis_limiter")

PLUGIN_NAME = "redis_limiter"

#: Where Redis is when ``url`` is null and ``$REDIS_URL`` is unset or empty.
DEFAULT_URL = "redis://127.0.0.1:6379/0"
URL_VARIABLE = "REDIS_URL"

MISSING_LIBRARY = ("redis_limiter needs the redis extra: pip install 'cometkit[redis]' "
                   "(the redis package)")

#: Shortest and longest sleep between two tries while waiting for a slot held elsewhere.
POLL_MIN_S = 0.005
POLL_MAX_S = 0.05
#: Longest single sleep on a wait Redis computed (a rate, a hold): look again at least this
#: often, so a change of picture (a refund, a closed client) is noticed.
MAX_SLEEP_S = 1.0
#: While Redis is unreachable, try it again after this many seconds.
RECONNECT_INTERVAL_S = 5.0

#: A model's shared adaptive state is forgotten after this long without an answer.
CONTROL_TTL_S = 3600.0

_OWN_OPTIONS = {
    "url": Option(
        "str", None, nullable=True, secret=True,
        help="Redis URL (redis://, rediss:// or unix://; a password in it is redacted "
             "wherever configuration is shown). null means $REDIS_URL, else "
             f"{DEFAULT_URL}.", example="redis://redis.internal:6379/0"),
    "key_prefix": Option(
        "str", "cometkit",
        help="First part of every Redis key; the second is a hash of the API key (never the "
             "key itself), so clients with the same key share limits."),
    "lease_ttl": Option(
        "float", 30.0, minimum=0.3, maximum=3600,
        help="Seconds a slot stays taken unless its process renews it (every lease_ttl / 3 "
             "while the attempt runs): how long a killed process can keep slots."),
    "on_redis_error": Option(
        "str", "local", choices=("local", "fail_open", "fail_closed"),
        help="When Redis cannot be reached: local (the in-process limiter with these options, "
             "a warning, Redis retried every few seconds), fail_open (admit) or fail_closed "
             "(raise RateLimitError)."),
    "socket_timeout": Option(
        "float", 0.5, minimum=0.01, maximum=60,
        help="Seconds any one Redis connect or command may take before Redis counts as "
             "unreachable."),
}

#: The ``plugins.redis_limiter`` section: the ``limiter``'s options, shared by the fleet, plus
#: where Redis is.
OPTIONS = {
    # A configured window is in-process only for now: the shared store keeps smooth rates.
    **{key: option for key, option in LIMITER_OPTIONS.items()
       if key not in ("window", "window_align")},
    "max_concurrency": Option(
        "int", None, minimum=1, nullable=True,
        help="Attempts in flight at once across every process using this Redis and API key; "
             "null means this client's concurrency (set it for a fleet).", example=16),
    **_OWN_OPTIONS,
}

# -------------------------------------------------------------------------------------------
# Lua scripts: limiting/lua/*.lua, each prefixed with common.lua (times are Redis' TIME in
# milliseconds; the comment at the top of each file says its KEYS, ARGV and answer).
# -------------------------------------------------------------------------------------------


def _lua(name: str) -> str:
    """The text of one script, with the shared prelude in front."""
    folder = resources.files("cometkit_plugins.limiting") / "lua"
    return (folder / "common.lua").read_text(encoding="utf-8") + (
        folder / f"{name}.lua").read_text(encoding="utf-8")


ACQUIRE_LUA = _lua("acquire")
RELEASE_LUA = _lua("release")
RENEW_LUA = _lua("renew")
LANE_GATE_LUA = _lua("lane_gate")
LANE_LEAVE_LUA = _lua("lane_leave")


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise PluginError(MISSING_LIBRARY) from exc
    return redis


def resolve_url(url: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """``url``, or (null) ``$REDIS_URL`` when set and not empty, or :data:`DEFAULT_URL`."""
    if url:
        return url
    env = os.environ if environ is None else environ
    return env.get(URL_VARIABLE) or DEFAULT_URL


def shown_url(url: str) -> str:
    """``url`` without user name or password, for logs and error messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable Redis URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _gcra(per_minute: Optional[float], burst: float, margin: float) -> tuple[float, float]:
    """``(emission interval in ms, capacity)`` of a rate: the in-process bucket's numbers
    (:func:`.plan.paced_rate`); ``(0, 0)`` for no limit."""
    paced = paced_rate(per_minute, burst, margin)
    if paced is None:
        return 0.0, 0.0
    rate_per_s, capacity = paced
    return 1000.0 / rate_per_s, capacity


def lane_scope(base: str, model: Optional[str]) -> str:
    """The first part of every key of ``model``'s lane."""
    # "*" for calls without a model: a model of that name would be quoted to %2A.
    return f"{base}:model:{'*' if model is None else quote(model, safe='')}"


class _Lane:
    """One model's keys and limits (the calls without a model share one lane)."""

    __slots__ = ("model", "label", "slots", "rpm", "tpm", "hold", "control", "pace",
                 "learned_tpm", "learned", "window", "max_concurrency", "rpm_gcra", "tpm_gcra",
                 "version", "shared", "mine", "counters", "active", "gap", "introduced")

    def __init__(self, base: str, model: Optional[str], max_concurrency: int,
                 rpm_gcra: tuple[float, float], tpm_gcra: tuple[float, float]) -> None:
        self.model = model
        self.label = model or "-"
        scope = lane_scope(base, model)
        self.slots = f"{scope}:slots"
        self.rpm = f"{scope}:rpm"
        self.tpm = f"{scope}:tpm"
        self.hold = f"{scope}:hold"
        self.control = f"{scope}:control"
        #: The fleet's learned send interval and token bucket (GCRA), and what it learned.
        self.pace = f"{scope}:pace"
        self.learned_tpm = f"{scope}:learned_tpm"
        self.learned = f"{scope}:learned"
        #: The fleet's admissions in the current window of a known window limit.
        self.window = f"{scope}:window"
        #: 0 when the lane needs no slots of its own (no model limit, not adaptive).
        self.max_concurrency = max_concurrency
        self.rpm_gcra = rpm_gcra
        self.tpm_gcra = tpm_gcra
        # What this process knows of the fleet's learning (guarded by the limiter's lock):
        #: the version of ``learned`` last seen, its fields as last seen, and this process's
        #: own :meth:`AdaptiveControl.learned` as last published or adopted.
        self.version = 0
        self.shared: dict[str, Any] = {}
        self.mine: dict[str, Any] = {}
        #: The fleet's counters (sent, accepted, sent tokens, accepted tokens) last seen.
        self.counters: Optional[list[int]] = None
        #: Acquires under way plus leases held; ``gap``: it fell to 0 since the counters were
        #: last seen (what the fleet did meanwhile happened while this lane was idle).
        self.active = 0
        self.gap = False
        #: What the fleet learned was read before this process's first admission.
        self.introduced = False


class _RedisPermit:
    """A lease in Redis; handed back to :meth:`RedisLimiter.release` once."""

    __slots__ = ("id", "lane", "cost", "answer_reserved", "admitted_at", "released", "paced",
                 "learned_tpm_interval", "fleet_level", "window_rank")

    def __init__(self, permit_id: str, lane: _Lane, cost: int, admitted_at: str,
                 paced: Any = None, answer_reserved: int = 0,
                 learned_tpm_interval: float = 0.0, fleet_level: int = 0,
                 window_rank: int = 0) -> None:
        self.id = permit_id
        self.lane = lane
        self.cost = cost
        #: ``max_tokens`` of the request: providers charge at least that for the answer.
        self.answer_reserved = answer_reserved
        #: The permit of this process's pacer (adaptive mode), released with the lease.
        self.paced = paced
        #: Redis' time of admission (ms), to tell a new 429 from an echo of the last cut.
        self.admitted_at = admitted_at
        #: The fleet's learned token interval (ms) it was charged at, refunded at the same.
        self.learned_tpm_interval = learned_tpm_interval
        #: The fleet's attempts of the lane in flight when it was admitted, itself included.
        self.fleet_level = fleet_level
        #: Its place among the fleet's admissions in a known window (1 for the first; 0: no
        #: window known).
        self.window_rank = window_rank
        self.released = False

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<redis_limiter lease model={self.lane.label} tokens={self.cost} {state}>"


class _LocalPermit:
    """A permit of the in-process fallback limiter, admitted while Redis was unreachable."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner


class _OpenPermit:
    """Admitted without limits (``fail_open`` while Redis was unreachable)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<redis_limiter open permit>"


_OPEN = _OpenPermit()


class RedisLimiter:
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
        self.options = validate_section(OPTIONS, {
            "max_concurrency": max_concurrency, "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute, "burst": burst, "adaptive": adaptive,
            "safety_margin": safety_margin, "acquire_timeout": acquire_timeout,
            "models": dict(models or {}), "url": url, "key_prefix": key_prefix,
            "lease_ttl": lease_ttl, "on_redis_error": on_redis_error,
            "socket_timeout": socket_timeout,
            "starvation_share": starvation_share, "starvation_s": starvation_s,
        }, where="<RedisLimiter>", key_path=PLUGIN_NAME)
        max_concurrency = concurrency_number(max_concurrency, PLUGIN_NAME, "RedisLimiter")
        redis = _import_redis()
        # What a dead or stuck Redis raises (redis-py wraps most socket errors, not all).
        self._redis_error: tuple = (redis.RedisError, OSError)
        self.url = resolve_url(url)
        self.url_shown = shown_url(self.url)
        self.key_prefix = key_prefix
        self.namespace = namespace or "nokey"
        self.base_key = f"{key_prefix}:{self.namespace}"
        self.max_concurrency = max_concurrency
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.burst = float(burst)
        self.adaptive = bool(adaptive)
        self.safety_margin = float(safety_margin)
        self.acquire_timeout = acquire_timeout
        self.models = {name: dict(section) for name, section in (models or {}).items()}
        self.lease_ttl = float(lease_ttl)
        self.on_redis_error = on_redis_error
        self.socket_timeout = float(socket_timeout)
        self.reconnect_interval_s = float(reconnect_interval_s)
        self.clock: Clock = clock or SystemClock()
        self.random = rng or Random()
        self._real_time = self.clock.sleep is time.sleep
        if redis_client is None:
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # No retries inside redis-py: a dead Redis must cost one timeout, not several
            # with backoff in between; the fallback and the reconnect interval take over.
            redis_client = redis.Redis.from_url(
                self.url, socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout, retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False, health_check_interval=0)
        self._redis = redis_client
        self._acquire_script = redis_client.register_script(ACQUIRE_LUA)
        self._release_script = redis_client.register_script(RELEASE_LUA)
        self._renew_script = redis_client.register_script(RENEW_LUA)
        self._lease_ms = int(round(self.lease_ttl * 1000))
        self._client_slots = f"{self.base_key}:all:slots"
        self._client_rpm = f"{self.base_key}:all:rpm"
        self._client_tpm = f"{self.base_key}:all:tpm"
        self._client_rpm_gcra = _gcra(requests_per_minute, self.burst, self.safety_margin)
        self._client_tpm_gcra = _gcra(tokens_per_minute, self.burst, self.safety_margin)
        # Adaptive mode may learn a token rate the fleet then spends at: tokens are counted.
        # Adaptive mode learns the fleet's token rate from the counted tokens of every call.
        self._count_tokens = self.adaptive or tokens_limited(tokens_per_minute, self.models)
        self._lanes: dict[Optional[str], _Lane] = {}
        self._lock = threading.Lock()
        self._held: dict[str, _RedisPermit] = {}
        self._renewer: Optional[threading.Thread] = None
        self._closing = threading.Event()
        self._closed = False
        self._pid = os.getpid()
        # Reachability: None while Redis answers, else clock.monotonic() of the last failure.
        self._down_at: Optional[float] = None
        self._state_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._local: Optional[AdmissionLimiter] = None
        # Adaptive mode is the in-process limiter's policy (send rate, token rate, holds,
        # probes, windows, caps on calls in flight), one control per model in this process,
        # fed what the whole fleet sent and had accepted: what it learns is the fleet's, and
        # is shared through Redis (see _share and _take_in), where the learned rates are
        # enforced fleet-wide.
        self._pacer: Optional[AdmissionLimiter] = (
            AdmissionLimiter(max_concurrency=self.max_concurrency, burst=self.burst,
                             safety_margin=self.safety_margin, clock=self.clock,
                             starvation_share=starvation_share, starvation_s=starvation_s)
            if self.adaptive else None)
        self._control_ttl_ms = int(CONTROL_TTL_S * 1000)
        self._fleet_lanes = FleetLanes(
            redis_client.register_script(LANE_GATE_LUA),
            redis_client.register_script(LANE_LEAVE_LUA), starvation_share=starvation_share,
            starvation_s=starvation_s, clock=self.clock)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, concurrency: int, namespace: str = "",
                     clock: Optional[Clock] = None, rng: Optional[Random] = None
                     ) -> RedisLimiter:
        """Build from a validated ``plugins.redis_limiter`` section; a null
        ``max_concurrency`` means ``concurrency``."""
        return cls(**factory_kwargs(options, OPTIONS, concurrency), namespace=namespace,
                   clock=clock, rng=rng)

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
        if self._redis_usable():
            paced = None
            if self._pacer is not None:
                remaining = None if deadline is None else max(0.0, deadline -
                                                              self.clock.monotonic())
                paced = self._pacer.acquire(request, remaining)
            try:
                permit = self._acquire_shared(request, cost, deadline, timeout)
            except BaseException as exc:
                if paced is not None:  # not sent: the pacer learns nothing from it
                    self._pacer.release(paced, AttemptResult(request, 0, error=exc))
                if not isinstance(exc, self._redis_error):
                    raise
                self._went_down(exc)
            else:
                if paced is not None:  # a cap on calls in flight counts the fleet's ...
                    paced.level = max(paced.level, permit.fleet_level)
                    paced.window_rank = permit.window_rank  # ... and so does a window
                permit.paced = paced
                permit.answer_reserved = answer
                return permit
        return self._acquire_without_redis(request, deadline)

    def release(self, permit: Any, result: AttemptResult) -> Optional[Throttle]:
        """The attempt ended: give its slot back, settle its tokens, share what a 429 says.

        :returns: for a 429 in adaptive mode, a :class:`cometkit.Throttle` that is
            ``accepting`` while *any* process of the fleet saw this model accepted within
            the storm horizon: the refused call waits out the shared hold instead of spending
            its attempts.
        """
        if isinstance(permit, _LocalPermit):
            if self._local is not None:
                return self._local.release(permit.inner, result)
            return None
        if not isinstance(permit, _RedisPermit):
            if permit is not _OPEN:
                logger.debug("release() of something that is not a permit of this limiter: %r",
                             permit)
            return None
        return self._release(permit, result)

    def close(self) -> None:
        """Refuse new attempts and stop renewing leases (attempts in flight still release)."""
        self._closed = True
        self._closing.set()
        renewer = self._renewer
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=2 * self.socket_timeout + 1.0)
        for limiter in (self._local, self._pacer):
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
        with self._lock:
            held = len(self._held)
            lanes = list(self._lanes.values())
        out: dict[str, Any] = {
            "backend": "redis" if self._down_at is None else self.on_redis_error,
            "held": held, "in_flight": None, "max_concurrency": self.max_concurrency,
            "closed": self._closed, "models": {},
        }
        if self._down_at is not None:
            return out
        try:
            seconds, micros = self._redis.time()
            now_ms = seconds * 1000 + micros / 1000
            pipe = self._redis.pipeline(transaction=False)
            pipe.zcount(self._client_slots, now_ms, "+inf")
            for lane in lanes:
                pipe.zcount(lane.slots, now_ms, "+inf")
                pipe.hget(lane.control, "limit")
                pipe.pttl(lane.hold)
                pipe.hgetall(lane.learned)
            values = pipe.execute()
        except self._redis_error as exc:
            self._went_down(exc)
            out["backend"] = self.on_redis_error
            return out
        out["in_flight"] = values[0]
        for index, lane in enumerate(lanes):
            in_flight, limit, hold_ms, learned = values[1 + 4 * index: 5 + 4 * index]
            allowed = self._lane_cap(lane.model)
            if self.adaptive:
                shared = float(limit) if limit is not None else float(INITIAL_LIMIT)
                allowed = min(allowed, max(1, int(shared)))
            entry = out["models"][lane.model] = {
                "in_flight": in_flight, "limit": allowed,
                "hold_remaining_s": max(0, hold_ms) / 1000.0, "learned": _decoded(learned)}
            if self._pacer is not None:
                entry["process"] = self._pacer.with_control(lane.model, self._snapshot)
        return out

    # -- shared admission ----------------------------------------------------------------------

    def _lane_cap(self, model: Optional[str]) -> int:
        return lane_cap(self.max_concurrency, self.models, model)

    def _lane(self, model: Optional[str]) -> _Lane:
        with self._lock:
            lane = self._lanes.get(model)
            if lane is None:
                section = self.models.get(model, {}) if model is not None else {}
                own_cap = section.get("max_concurrency") is not None
                lane = _Lane(
                    self.base_key, model,
                    self._lane_cap(model) if (self.adaptive or own_cap) else 0,
                    _gcra(section.get("requests_per_minute"), self.burst, self.safety_margin),
                    _gcra(section.get("tokens_per_minute"), self.burst, self.safety_margin))
                self._lanes[model] = lane
            return lane

    def _acquire_shared(self, request: RequestInfo, cost: int, deadline: Optional[float],
                        timeout: Optional[float]) -> _RedisPermit:
        lane = self._lane(request.model)
        permit_id = f"{os.getpid()}-{uuid.uuid4().hex[:16]}"
        keys = [self._client_slots, self._client_rpm, self._client_tpm, lane.slots, lane.rpm,
                lane.tpm, lane.hold, lane.control, lane.pace, lane.learned_tpm, lane.learned,
                lane.window]
        head = [permit_id, self._lease_ms, self.max_concurrency, *self._client_rpm_gcra,
                *self._client_tpm_gcra, lane.max_concurrency, *lane.rpm_gcra, *lane.tpm_gcra,
                cost, 1 if self.adaptive else 0, min(lane.max_concurrency or 1, INITIAL_LIMIT)]
        backoff = POLL_MIN_S
        waiter = self._fleet_lanes.waiter(FleetLanes.keys(
            lane_scope(self.base_key, lane.model), f"{self.base_key}:all"), permit_id, request)
        with self._lock:
            lane.active += 1
        granted = False
        try:
            if not lane.introduced:
                self._introduce(lane)
            while True:
                turn = self._lane_turn(waiter, deadline, timeout)
                news, pace, token_pace, limits = self._share(lane)
                with self._lock:
                    known = lane.version
                reply = self._acquire_script(keys=keys, args=[
                    *head, pace, *token_pace, known, self._control_ttl_ms, *limits, *news])
                granted = reply[0] == 1
                value, detail = reply[1], reply[2]
                self._take_in(lane, reply[5:], (1, 0, cost, 0) if granted else (0, 0, 0, 0))
                if granted:
                    self._leave_lane(waiter, admitted=True, overtook=turn == OVERTAKE)
                    permit = _RedisPermit(permit_id, lane, cost, _text(value),
                                          learned_tpm_interval=token_pace[0],
                                          fleet_level=int(reply[3]), window_rank=int(reply[4]))
                    with self._lock:
                        self._held[permit_id] = permit
                    self._ensure_renewer()
                    return permit
                waiter.held_up(self._client_wide(lane, _text(detail)))
                now = self.clock.monotonic()
                if deadline is not None and now >= deadline:
                    raise self._timeout_error(request, timeout, _text(detail))
                if value >= 0 and not (_text(detail) == "window"
                                       and self._quota_open(lane)):
                    # Redis knows when: a hold ending, a rate refilling, a window opening
                    self._wait(min(MAX_SLEEP_S, value / 1000.0), deadline, now)
                else:  # a slot held elsewhere: poll, backing off, with jitter
                    backoff = self._poll(backoff, deadline, now)
        finally:
            if not granted:
                self._idle(lane)
                self._leave_lane(waiter)

    def _quota_open(self, lane: _Lane) -> bool:
        """Whether the window quota that turned a call away may still rise (see
        :attr:`AdaptiveControl.window_quota_open`): then the call polls, not sleeps to the
        window's end, so the fleet's probes of one more follow each other at the pace of
        answers."""
        return self._pacer is not None and bool(self._pacer.with_control(
            lane.model, lambda control: control.window_quota_open))

    @staticmethod
    def _client_wide(lane: _Lane, reason: str) -> bool:
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
        except self._redis_error as exc:
            logger.debug("could not leave the fleet's queue of waiters: %s", exc)

    # -- what the fleet learned ------------------------------------------------------------

    def _share(self, lane: _Lane) -> tuple[list[str], float, tuple[float, float], list]:
        """What this process's control of ``lane`` learned since it last said (field/value
        pairs for the acquire script to publish; a value it unlearned is published as
        ``null``), and the limits it sends under now, for Redis to enforce on every process
        together: the learned send interval in ms, the learned token interval and capacity
        (``burst`` seconds' worth, as the in-process store's learned token bucket), and the
        known window (length ms, quota, aligned, slack ms) and ceiling on calls in flight.
        They are the fleet's: rates measured over what the whole fleet had accepted, a
        window's quota counted over the fleet's acceptances, a ceiling over its calls in
        flight."""
        if self._pacer is None:
            return [], 0.0, (0.0, 0.0), list(_NO_LIMITS)
        found = self._pacer.with_control(lane.model, _fleet_view)
        if found is None:
            return [], 0.0, (0.0, 0.0), list(_NO_LIMITS)
        learned, rate, token_rate, limits = found
        with self._lock:
            news = {key: value for key, value in learned.items()
                    if value != lane.mine.get(key)
                    and (value is not None or lane.shared.get(key) is not None)}
            lane.mine = learned
            lane.shared.update(news)
        pairs = [item for key, value in news.items() for item in (key, json.dumps(value))]
        token_pace = _gcra(token_rate * 60.0, self.burst, 0.0) if token_rate else (0.0, 0.0)
        return pairs, (1000.0 / rate if rate else 0.0), token_pace, limits

    def _publish(self, lane: _Lane) -> None:
        """Tell the fleet at once what a refusal taught this process (a window, a ceiling),
        rather than with its next admission, which may never come."""
        pairs = self._share(lane)[0]
        if not pairs:
            return
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(lane.learned, mapping=dict(zip(pairs[::2], pairs[1::2])))
            pipe.hincrby(lane.learned, "version", 1)
            pipe.pexpire(lane.learned, self._control_ttl_ms)
            version = int(pipe.execute()[1])
        except self._redis_error as exc:
            self._went_down(exc)
            return
        with self._lock:
            if lane.version == version - 1:  # nothing else was published meanwhile
                lane.version = version

    def _take_in(self, lane: _Lane, tail: list, own: tuple[int, int, int, int]) -> None:
        """Feed this process's control of ``lane`` what a script answered: what the rest of
        the fleet sent and had accepted since this process last looked (the growth of the
        fleet's counters less ``own``, this call's part in it), counted only while this lane
        was busy throughout; and what the fleet learned that this process has not seen yet.
        """
        if self._pacer is None or len(tail) < 4:
            return
        counters = [int(float(_text(value))) for value in tail[:4]]
        adopted: dict[str, Any] = {}
        with self._lock:
            seen, lane.counters = lane.counters, (
                counters if lane.counters is None
                else [max(a, b) for a, b in zip(lane.counters, counters)])
            elsewhere = None
            if seen is not None and not lane.gap:
                elsewhere = [max(0, now - then - mine)
                             for now, then, mine in zip(counters, seen, own)]
            lane.gap = False
            if len(tail) > 4:
                adopted = self._news(lane, int(_text(tail[4])), _decoded(dict(
                    zip(tail[5::2], tail[6::2]))))
        self._feed(lane, elsewhere, adopted)

    def _introduce(self, lane: _Lane) -> None:
        """Before this process's first admission of ``lane``: take in what the fleet learned,
        so that even the first call goes out at the fleet's rates (one read, once)."""
        if self._pacer is not None:
            learned = self._redis.hgetall(lane.learned)
            version = next((int(_text(value)) for key, value in learned.items()
                            if _text(key) == "version"), 0)
            with self._lock:
                adopted = self._news(lane, version, _decoded(learned))
            self._feed(lane, None, adopted)
        lane.introduced = True

    @staticmethod
    def _news(lane: _Lane, version: int, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of a newer version of the fleet's learning that changed (with the lock
        held)."""
        if version <= lane.version:
            return {}
        lane.version = version
        changed = {key: value for key, value in fields.items() if lane.shared.get(key) != value}
        lane.shared.update(changed)
        return changed

    def _feed(self, lane: _Lane, elsewhere: Optional[list[int]],
              adopted: Mapping[str, Any]) -> None:
        """Hand the control what the others did (``elsewhere``: sent, accepted, sent tokens,
        accepted tokens) and what the fleet learned that is new here (``adopted``)."""
        if self._pacer is None or (not adopted and not (elsewhere and any(elsewhere))):
            return

        def feed(control: AdaptiveControl) -> dict[str, Any]:
            if elsewhere and any(elsewhere):
                control.accepted_elsewhere(*elsewhere)
            if adopted:
                control.adopt(adopted)
            return control.learned()

        learned = self._pacer.with_control(lane.model, feed)
        if adopted and learned is not None:
            with self._lock:  # taken in, not learned here: not news to publish back
                for key in adopted:
                    lane.mine[key] = learned.get(key)
            logger.debug("model=%s: adopted what the fleet learned: %s", lane.label, adopted)

    def _snapshot(self, control: AdaptiveControl) -> dict[str, Any]:
        return control.snapshot(self.clock.monotonic())

    def _held_for(self, lane: _Lane) -> float:
        """Seconds the adaptive policy holds ``lane`` from now (after a refusal): the fleet
        holds as long."""
        if self._pacer is None:
            return 0.0
        now = self.clock.monotonic()
        return self._pacer.with_control(
            lane.model, lambda control: max(0.0, control.hold_until - now)) or 0.0

    def _idle(self, lane: _Lane) -> None:
        with self._lock:
            lane.active -= 1
            if lane.active <= 0:
                lane.active = 0
                lane.gap = True

    def _release(self, permit: _RedisPermit, result: AttemptResult) -> Optional[Throttle]:
        with self._lock:
            if permit.released:
                logger.debug("permit released twice: %r", permit)
                return None
            permit.released = True
            self._held.pop(permit.id, None)
        local = None
        if permit.paced is not None and self._pacer is not None:
            local = self._pacer.release(permit.paced, result)
        try:
            return self._release_shared(permit, result, local)
        finally:
            self._idle(permit.lane)

    def _release_shared(self, permit: _RedisPermit, result: AttemptResult,
                        local: Optional[Throttle]) -> Optional[Throttle]:
        """Give the lease back, settle its tokens, and tell the fleet what the answer was: an
        acceptance (counted, and the shared concurrency grows), or a refusal, which holds
        every process for as long as the adaptive policy holds this one and cuts the shared
        concurrency once per burst."""
        if self._down_at is not None:
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
                    outcome, hold_s = "429", self._held_for(lane)
            elif result.accepted:
                outcome = "ok"
                charged = charged_tokens(result, permit.answer_reserved) or 0
        try:
            reply = self._release_script(
                keys=[self._client_slots, lane.slots, self._client_tpm, lane.tpm, lane.hold,
                      lane.control, lane.learned_tpm],
                args=[permit.id, refund, self._client_tpm_gcra[0], lane.tpm_gcra[0],
                      permit.learned_tpm_interval, outcome, int(round(hold_s * 1000)),
                      permit.admitted_at, lane.max_concurrency,
                      min(lane.max_concurrency or 1, INITIAL_LIMIT), CONCURRENCY_BACKOFF,
                      self._control_ttl_ms, charged])
        except self._redis_error as exc:
            self._went_down(exc)
            return local
        _held, limit, cut, ok_age_ms = reply[:4]
        self._take_in(lane, reply[4:], (0, 1, 0, charged) if outcome == "ok" else (0, 0, 0, 0))
        if cut == 1:
            logger.info("429 for model=%s: shared concurrency now %d, holding admissions "
                        "%.2f s in every process", lane.label, max(1, int(float(limit))),
                        hold_s)
        if result.status_code != 429 or not self.adaptive:
            if outcome == "ok" and permit.window_rank:
                # An accepted rank may have raised a quota still open (a probe of one
                # more): the fleet's waiters poll for it, so tell them now.
                self._publish(lane)
            return local
        self._publish(lane)
        age_s = float(_text(ok_age_ms)) / 1000.0
        fleet_accepting = 0 <= age_s <= STORM_HORIZON_S
        if local is not None:
            return Throttle((local.accepting or fleet_accepting) and local.kind != "quota",
                            local.kind, local.wait_s)
        return Throttle(fleet_accepting, "rate", None)

    def _timeout_error(self, request: RequestInfo, timeout: Optional[float],
                       reason: str) -> RateLimitError:
        waiting_for = {"hold": "a shared hold after a 429", "rate": "a shared rate limit",
                       "pace": "the fleet's learned send or token rate",
                       "window": "the fleet's quota of a window to open",
                       "slots": "a shared concurrency slot",
                       "lane": "calls of a higher priority lane"}.get(reason, reason)
        return RateLimitError(
            f"redis_limiter did not admit {request.method} {request.route} "
            f"model={request.model or '-'} within acquire_timeout={timeout:g} s "
            f"(waiting for {waiting_for}; Redis {self.url_shown}, key {self.base_key})",
            status_code=429)

    # -- leases --------------------------------------------------------------------------------

    def _ensure_renewer(self) -> None:
        with self._lock:
            if self._renewer is not None and self._renewer.is_alive():
                return
            self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                             name=f"cometkit-redis-leases-{self.namespace}")
            self._renewer.start()

    def _renew_loop(self) -> None:
        """Extend the leases of running attempts every ``lease_ttl / 3`` (real time: the
        leases expire in Redis' time, whatever clock the client was given)."""
        while not self._closing.wait(self.lease_ttl / 3.0):
            with self._lock:
                permits = list(self._held.values())
            if not permits or self._down_at is not None:
                continue
            keys: list[str] = []
            args: list[Any] = [self._lease_ms]
            for permit in permits:
                keys.append(self._client_slots)
                args.append(permit.id)
                if permit.lane.max_concurrency:
                    keys.append(permit.lane.slots)
                    args.append(permit.id)
            try:
                lost = {_text(item) for item in self._renew_script(keys=keys, args=args)}
            except self._redis_error as exc:
                self._went_down(exc)
                continue
            with self._lock:
                expired = [self._held[i] for i in lost if i in self._held]
            for permit in expired:
                logger.warning("the lease of a running attempt (%r) had expired before it was "
                               "renewed: this process stalled for more than lease_ttl=%g s, and "
                               "its slot may have been given to another", permit,
                               self.lease_ttl)

    # -- Redis unreachable ---------------------------------------------------------------------

    def _redis_usable(self) -> bool:
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
            except self._redis_error as exc:
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

    def _went_down(self, exc: BaseException) -> None:
        with self._state_lock:
            first = self._down_at is None
            self._down_at = self.clock.monotonic()
        if not first:
            return
        instead = {
            "local": "this process applies the limits alone (in-process limiter)",
            "fail_open": "attempts go out without limits",
            "fail_closed": "attempts fail with RateLimitError",
        }[self.on_redis_error]
        logger.warning("Redis at %s is unreachable (%s: %s): %s until it answers again "
                       "(tried every %g s)", self.url_shown, type(exc).__name__, exc, instead,
                       self.reconnect_interval_s)

    def _acquire_without_redis(self, request: RequestInfo, deadline: Optional[float]) -> Any:
        if self.on_redis_error == "fail_open":
            return _OPEN
        if self.on_redis_error == "fail_closed":
            raise RateLimitError(
                f"redis_limiter: Redis at {self.url_shown} is unreachable and on_redis_error "
                f"is fail_closed: {request.method} {request.route} "
                f"model={request.model or '-'} was not sent", status_code=429)
        with self._state_lock:
            if self._local is None:
                self._local = AdmissionLimiter.from_options(
                    self.options, concurrency=self.max_concurrency, clock=self.clock)
            local = self._local
        remaining = None if deadline is None else max(0.0, deadline - self.clock.monotonic())
        return _LocalPermit(local.acquire(request, remaining))

    # -- plumbing ------------------------------------------------------------------------------

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
        if self._closed:
            raise RuntimeError("the limiter was closed while this attempt waited")

    def _sleep(self, seconds: float) -> None:
        if self._real_time:
            self._closing.wait(seconds)  # close() cuts the wait short
        else:
            self.clock.sleep(seconds)

    def _after_fork(self) -> None:
        """In a forked child (gunicorn --preload): the parent's leases and renewal thread are
        not this process's; redis-py reconnects by itself."""
        pid = os.getpid()
        if pid == self._pid:
            return
        self._pid = pid
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._held = {}
        self._renewer = None


#: The acquire script's window and ceiling arguments when none is known.
_NO_LIMITS = (0, 0, 0, 0, 0)


def _fleet_view(control: AdaptiveControl) -> tuple[dict, Optional[float], Optional[float], list]:
    """What :meth:`RedisLimiter._share` reads of a lane's control, under the pacer's lock."""
    limits = list(_NO_LIMITS)
    rate = control.rate_per_s
    if control.window_s is not None and control.window_quota:
        limits[:4] = [int(round(control.window_s * 1000)), int(control.window_quota),
                      1 if control.window_aligned else 0, int(round(WINDOW_SLACK_S * 1000))]
        rate = None  # a window's quota goes out together, as in the process (``ready_at``)
    if control.ceiling is not None:
        limits[4] = int(control.ceiling)
    return control.learned(), rate, control.token_rate_per_s, limits


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(learned: Mapping[Any, Any]) -> dict[str, Any]:
    """The ``learned`` hash (or a script's field/value pairs) as values (JSON each), without
    its version counter."""
    return {_text(key): json.loads(_text(value)) for key, value in learned.items()
            if _text(key) != "version"}
