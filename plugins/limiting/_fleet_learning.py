"""What adaptive mode learns, made the fleet's: the Redis store's side of the one policy.

Each process runs the one adaptive policy (:mod:`.adaptive`, in an in-process
``AdmissionLimiter`` per process, the *pacer*), told by every script answer what the rest of
the fleet sent and had accepted meanwhile, so the rates it learns are the rates the server gives
the fleet. What it learns is published to a lane's ``learned`` hash with its next acquire (or
at once after a refusal), taken in by every other process with theirs (and read once by a
process that joins), and the learned send and token rates are enforced in Redis for every
process together. :class:`FleetLearning` keeps and passes on; the learning rules stay in the
policy.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Mapping, Optional

from ._redis_fallback import RedisFallback
from ._redis_lanes import RedisLane, gcra
from ._redis_scripts import text
from .adaptive import WINDOW_SLACK_S, AdaptiveControl
from .local import AdmissionLimiter

__all__ = ["FleetLearning", "NO_LIMITS"]

logger = logging.getLogger("cometkit.redis_limiter")

#: The acquire script's window and ceiling arguments when none is known.
NO_LIMITS = (0, 0, 0, 0, 0)


class FleetLearning:
    """Passes what this process's adaptive policy learned to the fleet, and back.

    :param pacer: this process's in-process limiter whose controls run the adaptive policy;
        ``None`` when adaptive mode is off (then nothing is learned or shared).
    :param redis: the ``redis.Redis`` client (for a lane's ``learned`` hash).
    :param reachability: whether Redis answers.
    :param burst: seconds' worth of a learned token rate its bucket holds.
    :param control_ttl_ms: how long a model's shared state lives without an answer.
    """

    def __init__(self, pacer: Optional[AdmissionLimiter], redis: Any,
                 reachability: RedisFallback, *, burst: float, control_ttl_ms: int) -> None:
        self.pacer = pacer
        self._redis = redis
        self._reachability = reachability
        self._burst = burst
        self._control_ttl_ms = control_ttl_ms
        #: Guards what the lanes know of the fleet's learning (see :class:`.RedisLane`).
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        """In a forked child: a lock another thread of the parent held stays held; a new one."""
        self._lock = threading.Lock()

    # -- a lane's activity -------------------------------------------------------------------

    def busy(self, lane: RedisLane) -> None:
        """An acquire of ``lane`` begins (it stays busy until its lease is given back)."""
        with self._lock:
            lane.active += 1

    def idle(self, lane: RedisLane) -> None:
        """An acquire of ``lane`` gave up, or its lease was given back."""
        with self._lock:
            lane.active -= 1
            if lane.active <= 0:
                lane.active = 0
                lane.gap = True

    def version(self, lane: RedisLane) -> int:
        """The version of the fleet's learning of ``lane`` last seen here."""
        with self._lock:
            return lane.version

    # -- the control, read under the pacer's lock ----------------------------------------------

    def snapshot(self, lane: RedisLane) -> Optional[dict[str, Any]]:
        """What this process's policy holds now for ``lane`` (``None``: not adaptive)."""
        if self.pacer is None:
            return None
        clock = self.pacer.clock
        return self.pacer.with_control(
            lane.model, lambda control: control.snapshot(clock.monotonic()))

    def held_for(self, lane: RedisLane) -> float:
        """Seconds the adaptive policy holds ``lane`` from now (after a refusal): the fleet
        holds as long."""
        if self.pacer is None:
            return 0.0
        now = self.pacer.clock.monotonic()
        return self.pacer.with_control(lane.model, lambda control: control.held_s(now)) or 0.0

    def quota_open(self, lane: RedisLane) -> bool:
        """Whether the window quota that turned a call away may still rise (see
        :attr:`AdaptiveControl.window_quota_open`): then the call polls, not sleeps to the
        window's end, so the fleet's probes of one more follow each other at the pace of
        answers."""
        return self.pacer is not None and bool(self.pacer.with_control(
            lane.model, lambda control: control.window_quota_open))

    # -- to the fleet --------------------------------------------------------------------------

    def share(self, lane: RedisLane) -> tuple[list[str], float, tuple[float, float], list]:
        """What this process's control of ``lane`` learned since it last said (field/value
        pairs for the acquire script to publish; a value it unlearned is published as
        ``null``), and the limits it sends under now, for Redis to enforce on every process
        together: the learned send interval in ms, the learned token interval and capacity
        (``burst`` seconds' worth, as the in-process store's learned token bucket), and the
        known window (length ms, quota, aligned, slack ms) and ceiling on calls in flight.
        They are the fleet's: rates measured over what the whole fleet had accepted, a
        window's quota counted over the fleet's acceptances, a ceiling over its calls in
        flight."""
        if self.pacer is None:
            return [], 0.0, (0.0, 0.0), list(NO_LIMITS)
        found = self.pacer.with_control(lane.model, _fleet_view)
        if found is None:
            return [], 0.0, (0.0, 0.0), list(NO_LIMITS)
        learned, rate, token_rate, limits = found
        with self._lock:
            news = {key: value for key, value in learned.items()
                    if value != lane.mine.get(key)
                    and (value is not None or lane.shared.get(key) is not None)}
            lane.mine = learned
            lane.shared.update(news)
        pairs = [item for key, value in news.items() for item in (key, json.dumps(value))]
        token_pace = gcra(token_rate * 60.0, self._burst, 0.0) if token_rate else (0.0, 0.0)
        return pairs, (1000.0 / rate if rate else 0.0), token_pace, limits

    def publish(self, lane: RedisLane) -> None:
        """Tell the fleet at once what a refusal taught this process (a window, a ceiling),
        rather than with its next admission, which may never come."""
        pairs = self.share(lane)[0]
        if not pairs:
            return
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(lane.learned, mapping=dict(zip(pairs[::2], pairs[1::2])))
            pipe.hincrby(lane.learned, "version", 1)
            pipe.pexpire(lane.learned, self._control_ttl_ms)
            version = int(pipe.execute()[1])
        except self._reachability.errors as exc:
            self._reachability.went_down(exc)
            return
        with self._lock:
            if lane.version == version - 1:  # nothing else was published meanwhile
                lane.version = version

    # -- from the fleet ------------------------------------------------------------------------

    def take_in(self, lane: RedisLane, tail: list, own: tuple[int, int, int, int]) -> None:
        """Feed this process's control of ``lane`` what a script answered: what the rest of
        the fleet sent and had accepted since this process last looked (the growth of the
        fleet's counters less ``own``, this call's part in it), counted only while this lane
        was busy throughout; and what the fleet learned that this process has not seen yet.
        """
        if self.pacer is None or len(tail) < 4:
            return
        counters = [int(float(text(value))) for value in tail[:4]]
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
                adopted = self._news(lane, int(text(tail[4])), decoded(dict(
                    zip(tail[5::2], tail[6::2]))))
        self._feed(lane, elsewhere, adopted)

    def introduce(self, lane: RedisLane) -> None:
        """Before this process's first admission of ``lane``: take in what the fleet learned,
        so that even the first call goes out at the fleet's rates (one read, once)."""
        if self.pacer is not None:
            learned = self._redis.hgetall(lane.learned)
            version = next((int(text(value)) for key, value in learned.items()
                            if text(key) == "version"), 0)
            with self._lock:
                adopted = self._news(lane, version, decoded(learned))
            self._feed(lane, None, adopted)
        lane.introduced = True

    @staticmethod
    def _news(lane: RedisLane, version: int, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of a newer version of the fleet's learning that changed (with the lock
        held)."""
        if version <= lane.version:
            return {}
        lane.version = version
        changed = {key: value for key, value in fields.items() if lane.shared.get(key) != value}
        lane.shared.update(changed)
        return changed

    def _feed(self, lane: RedisLane, elsewhere: Optional[list[int]],
              adopted: Mapping[str, Any]) -> None:
        """Hand the control what the others did (``elsewhere``: sent, accepted, sent tokens,
        accepted tokens) and what the fleet learned that is new here (``adopted``)."""
        if self.pacer is None or (not adopted and not (elsewhere and any(elsewhere))):
            return

        def feed(control: AdaptiveControl) -> dict[str, Any]:
            if elsewhere and any(elsewhere):
                control.accepted_elsewhere(*elsewhere)
            if adopted:
                control.adopt(adopted)
            return control.learned()

        learned = self.pacer.with_control(lane.model, feed)
        if adopted and learned is not None:
            with self._lock:  # taken in, not learned here: not news to publish back
                for key in adopted:
                    lane.mine[key] = learned.get(key)
            logger.debug("model=%s: adopted what the fleet learned: %s", lane.label, adopted)


def _fleet_view(control: AdaptiveControl) -> tuple[dict, Optional[float], Optional[float], list]:
    """What :meth:`FleetLearning.share` reads of a lane's control, under the pacer's lock."""
    limits = list(NO_LIMITS)
    rate = control.rate_per_s
    if control.window_s is not None and control.window_quota:
        limits[:4] = [int(round(control.window_s * 1000)), int(control.window_quota),
                      1 if control.window_aligned else 0, int(round(WINDOW_SLACK_S * 1000))]
        rate = None  # a window's quota goes out together, as in the process (``ready_at``)
    if control.ceiling is not None:
        limits[4] = int(control.ceiling)
    return control.learned(), rate, control.token_rate_per_s, limits


def decoded(learned: Mapping[Any, Any]) -> dict[str, Any]:
    """The ``learned`` hash (or a script's field/value pairs) as values (JSON each), without
    its version counter."""
    return {text(key): json.loads(text(value)) for key, value in learned.items()
            if text(key) != "version"}
