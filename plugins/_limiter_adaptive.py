"""Learning, from the answers to our own attempts, how hard a server lets us push.

One :class:`AdaptiveControl` per model lane of the ``limiter`` plugin. It never blocks and
never reads a clock: the limiter hands it ``now`` and asks it when the next admission may go
out. A server can refuse for two reasons, so it learns two limits:

- **Concurrency** (AIMD, as Netflix's concurrency-limits does on clients). It starts at
  :data:`INITIAL_LIMIT` and grows by one per success until the first signal (slow start:
  doubling every round trip), so that a fresh client meets a limit with a handful of calls in
  flight rather than all of its threads. A 429 multiplies it by :data:`CONCURRENCY_BACKOFF`;
  it then grows back by one per *window* of successes, a window being as many successes as the
  current limit (about one round trip of calls). Growing per success would climb straight
  back into the wall.
- **Send rate**: a server that answers in 10 ms still receives 100 calls/s at concurrency 1, so
  when the server's limit is a rate, concurrency alone cannot meet it. After a 429 the control
  measures what the server *accepted* since it last learned (successes per second of busy
  time, holds included, over at least :data:`MIN_MEASURE_S`) and sends at that rate. Against a
  token bucket that refills during the hold this is the bucket's rate. Then the rate rises
  while successes continue -- slowly at first (:data:`RATE_GROWTH_PER_S`), faster the longer
  no signal comes (:data:`RATE_ACCELERATION_PER_S`) -- so the bucket refilled during the hold
  is spent and a measurement that undershot is corrected. The idea is botocore's adaptive
  (CUBIC) token bucket, with the measured rate standing in for CUBIC's guess of where the wall
  is. When nothing can be measured yet, or the server accepted more than we sent (a burst it
  had saved), the rate is cut multiplicatively (:data:`RATE_BACKOFF`), and never below
  :data:`RATE_FLOOR` of the refused rate at once. A server refusing *everything* (a spent
  quota, an outage) teaches no rate: only a 429 after some success moves it.

A 429 also **holds** new admissions for the server's ``Retry-After`` (or
:data:`DEFAULT_HOLD_S`), and the first admissions after the hold go out **paced**, one every
``latency / allowed concurrency``, instead of as a herd; at other times admissions are spaced
by ``latency / (2 * allowed concurrency)``, which never limits throughput but spreads threads
released together. A success whose ``x-ratelimit-remaining-requests`` is low (at most
:data:`LOW_REMAINING_FRACTION` of the limit) is a *soft* signal: the rate drops by
:data:`SOFT_BACKOFF` before the 429 arrives, without a hold.

Only one signal per round trip counts: a 429 for an attempt sent before the last signal is an
echo of the same burst, not news, so a burst of 429s cuts once.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

from cometkit import AttemptResult
from cometkit.hints import ratelimit_remaining, retry_after_s

__all__ = [
    "AdaptiveControl",
    "CONCURRENCY_BACKOFF",
    "INITIAL_LIMIT",
    "RATE_BACKOFF",
    "RATE_FLOOR",
    "RATE_GROWTH_PER_S",
    "RATE_ACCELERATION_PER_S",
    "SOFT_BACKOFF",
    "DEFAULT_HOLD_S",
    "MAX_HOLD_S",
    "MIN_RATE_PER_S",
    "MIN_MEASURE_S",
    "LOW_REMAINING_FRACTION",
]

logger = logging.getLogger("cometkit.limiter")

#: Allowed concurrency after a 429: the limit times this (never below 1).
CONCURRENCY_BACKOFF = 0.7
#: Send rate after a signal, as a share of the refused rate, when the measurement cannot be
#: used (too short yet, or the server accepted more than we were sending).
RATE_BACKOFF = 0.7
#: While successes continue, the rate rises per second of sending by this share of the last
#: learned rate (growth is counted per success, so an idle client does not grow) ...
RATE_GROWTH_PER_S = 0.1
#: ... plus this share of what it has grown since: slow just above the rate that was measured,
#: faster the longer no signal comes, in case the measurement undershot (a hold longer than
#: the server needed makes it undershoot).
RATE_ACCELERATION_PER_S = 0.4
#: Multiplier of the send rate on a soft signal (few requests remaining, no 429 yet).
SOFT_BACKOFF = 0.9
#: Allowed concurrency at start-up; until the first signal it grows by one per success (it
#: doubles every round trip, as TCP's slow start), then by one per window.
INITIAL_LIMIT = 4
#: Admissions are always spaced by at least ``latency / (this * allowed concurrency)``: no
#: limit on throughput (concurrency binds first), but a crowd of threads re-admitted at the
#: same instant is spread out, so the first 429 is seen before all of them went out.
PACING_HEADROOM = 2.0
#: Never cut a learned rate below this share of the rate that was refused: a measurement
#: spanning a ramp from far below the limit, or a hold longer than the server needed,
#: undershoots.
RATE_FLOOR = 0.5
#: Hold after a 429 that carries no usable hint, in seconds.
DEFAULT_HOLD_S = 1.0
#: Longest hold, whatever the server says: the retry policy decides whether a call waits
#: longer; other calls should not queue for minutes behind one hint.
MAX_HOLD_S = 60.0
#: The learned rate never falls below this (calls per second).
MIN_RATE_PER_S = 0.5
#: A measurement over less busy time than this is a burst, not a rate (servers' buckets
#: commonly hold one second's worth).
MIN_MEASURE_S = 1.0
#: Shortest span a send rate is computed over (a first 429 within a few round trips).
MIN_SENT_SPAN_S = 0.1
#: A success reporting fewer remaining requests than this share of the limit is a soft signal.
LOW_REMAINING_FRACTION = 0.1
#: At most one soft signal per this many seconds: while the server's bucket stays low, every
#: answer says so, and re-learning on each would spiral the rate down.
SOFT_SIGNAL_INTERVAL_S = 1.0
#: Weight of the newest attempt in the smoothed attempt duration.
LATENCY_SMOOTHING = 0.2


class AdaptiveControl:
    """Allowed concurrency, send rate, hold and pacing of one lane, learned from outcomes.

    :param max_limit: the configured concurrency of the lane: the limit never grows past it.
    :param now: the clock's ``monotonic()`` at creation.
    """

    def __init__(self, max_limit: int, now: float) -> None:
        self.max_limit = int(max_limit)
        #: Allowed concurrency (a float so that repeated cuts and growth stay exact).
        self.limit = float(min(self.max_limit, INITIAL_LIMIT))
        #: Learned send rate in calls per second; ``None`` until a signal taught one.
        self.rate_per_s: Optional[float] = None
        #: No admission before this ``monotonic()`` time (the server's Retry-After).
        self.hold_until = -math.inf
        #: Smoothed duration of answered attempts, in seconds.
        self.latency_s: Optional[float] = None
        #: 429 answers seen, and congestion signals acted on (429 bursts and soft signals).
        self.throttled = 0
        self.signals = 0
        self._slow_start = True
        self._next_send_at = -math.inf
        self._last_signal_at = -math.inf
        self._ok_in_window = 0
        self._ok_since_signal = 0
        self._paced_left = 0
        self._learn_pending = False
        self._rate_at_signal: Optional[float] = None
        self._anchor_rate = 0.0
        # What the server accepted since the rate was last learned, over busy time only: time
        # with nothing to send says nothing about the server.
        self._epoch_ok = 0
        self._epoch_sent = 0
        self._epoch_busy_start = 0.0
        self._busy_s = 0.0
        self._busy_mark = now
        self._busy = False

    # -- admission -----------------------------------------------------------------------------

    def allowed(self) -> int:
        """How many attempts of this lane may be in flight now."""
        return max(1, int(self.limit))

    def ready_at(self) -> float:
        """Earliest ``monotonic()`` time of the next admission (hold and pacing)."""
        return max(self.hold_until, self._next_send_at)

    def on_admit(self, now: float) -> None:
        """An attempt of this lane was admitted at ``now``: space out the next one."""
        self._epoch_sent += 1
        if self._learn_pending and now >= self.hold_until:
            self._learn_rate(now)
        gap = 1.0 / self.rate_per_s if self.rate_per_s else 0.0
        if self.latency_s:
            headroom = PACING_HEADROOM
            if self._paced_left > 0:  # just after a hold: one per latency / allowed
                self._paced_left -= 1
                headroom = 1.0
            gap = max(gap, self.latency_s / (headroom * self.allowed()))
        if gap > 0.0:
            self._next_send_at = max(self._next_send_at, now) + gap

    def note_demand(self, now: float, busy: bool) -> None:
        """Whether the lane has attempts in flight or waiting, from ``now`` on."""
        if self._busy:
            self._busy_s += now - self._busy_mark
        self._busy_mark = now
        self._busy = busy

    # -- outcomes ------------------------------------------------------------------------------

    def on_result(self, result: AttemptResult, now: float,
                  wall_time: Callable[[], float]) -> None:
        """Learn from an attempt that ended at ``now``.

        :param wall_time: the clock's ``time()``, read only for an HTTP-date ``Retry-After``.
        """
        status = result.status_code
        if status is None:  # no answer: says nothing about the server's limits
            return
        duration = max(0.0, result.duration_s)
        if self.latency_s is None:
            self.latency_s = duration
        else:
            self.latency_s += LATENCY_SMOOTHING * (duration - self.latency_s)
        if status == 429:
            self._throttled(result, now, wall_time)
        elif status < 400:
            self._succeeded(result, now)

    def _throttled(self, result: AttemptResult, now: float,
                   wall_time: Callable[[], float]) -> None:
        self.throttled += 1
        hint = retry_after_s(result.headers, wall_time()) if result.headers else None
        hold = min(MAX_HOLD_S, DEFAULT_HOLD_S if hint is None else hint)
        self.hold_until = max(self.hold_until, now + hold)
        if result.started_at < self._last_signal_at:
            return  # an echo of the burst already acted on
        before = self.allowed()
        # Only a refusal after some acceptance says where the server's rate is: a server that
        # refuses everything (a quota, an outage) must not drive the rate to a crawl.
        self._learn_pending = self._ok_since_signal > 0
        self._signal(now)
        self.limit = max(1.0, self.limit * CONCURRENCY_BACKOFF)
        self._ok_in_window = 0
        self._paced_left = self.allowed()
        logger.info("429 for model=%s: concurrency %d -> %d, holding admissions %.2f s",
                    result.request.model or "-", before, self.allowed(), hold)

    def _succeeded(self, result: AttemptResult, now: float) -> None:
        self._epoch_ok += 1
        self._ok_since_signal += 1
        self._ok_in_window += 1
        if self._slow_start or self._ok_in_window >= self.limit:
            self._ok_in_window = 0
            self.limit = min(float(self.max_limit), self.limit + 1.0)
        remaining = ratelimit_remaining(result.headers)
        if (remaining is not None and remaining[0] <= LOW_REMAINING_FRACTION * remaining[1]
                and result.started_at >= self._last_signal_at
                and now - self._last_signal_at >= SOFT_SIGNAL_INTERVAL_S):
            self._signal(now)
            if self.rate_per_s is not None:
                self._set_rate(self.rate_per_s * SOFT_BACKOFF)
            else:
                measured = self._measured_rate(now)
                if measured is not None:
                    self._set_rate(measured)
            logger.debug("model=%s: %d of %d requests remain; send rate now %s/s",
                         result.request.model or "-", remaining[0], remaining[1],
                         "-" if self.rate_per_s is None else f"{self.rate_per_s:.2f}")
        elif self.rate_per_s is not None:
            growth_per_s = (RATE_GROWTH_PER_S * self._anchor_rate
                            + RATE_ACCELERATION_PER_S * (self.rate_per_s - self._anchor_rate))
            self.rate_per_s += growth_per_s / self.rate_per_s

    def _signal(self, now: float) -> None:
        self.signals += 1
        self._ok_since_signal = 0
        self._slow_start = False
        self._last_signal_at = now
        self._rate_at_signal = self.rate_per_s

    def _learn_rate(self, now: float) -> None:
        """Send at what the server accepted since the rate was last learned.

        Not below :data:`RATE_FLOOR` of the refused rate; and when the server accepted more
        than we were sending (a burst it had saved), or too little time has passed to tell,
        at :data:`RATE_BACKOFF` of the refused rate instead. The measurement keeps running
        until it spans :data:`MIN_MEASURE_S`, across as many signals as that takes.
        """
        self._learn_pending = False
        measured = self._measured_rate(now)
        before = self._rate_at_signal
        if measured is not None and (before is None or measured <= before):
            self._set_rate(measured if before is None else max(measured, before * RATE_FLOOR))
        elif before is not None:
            self._set_rate(before * RATE_BACKOFF)
        elif self._epoch_sent:  # the first signal came quickly: back off from what we sent
            busy_s = self._busy_s - self._epoch_busy_start
            self._set_rate(RATE_BACKOFF * self._epoch_sent / max(busy_s, MIN_SENT_SPAN_S))
        logger.debug("send rate %s/s (measured %s)",
                     "-" if self.rate_per_s is None else f"{self.rate_per_s:.2f}",
                     "-" if measured is None else f"{measured:.2f}/s")
        if measured is not None:
            self._epoch_ok = self._epoch_sent = 0
            self._epoch_busy_start = self._busy_s

    def _measured_rate(self, now: float) -> Optional[float]:
        """Successes per busy second since the rate was last learned (``None`` if too few)."""
        self.note_demand(now, self._busy)
        busy_s = self._busy_s - self._epoch_busy_start
        if not self._epoch_ok or busy_s < MIN_MEASURE_S:
            return None
        return self._epoch_ok / busy_s

    def _set_rate(self, rate: float) -> None:
        self.rate_per_s = self._anchor_rate = max(MIN_RATE_PER_S, rate)

    # -- reporting -----------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """What the control has learned, for :meth:`AdmissionLimiter.stats` and logs."""
        return {
            "limit": self.allowed(),
            "rate_per_s": self.rate_per_s,
            "hold_remaining_s": max(0.0, self.hold_until - now),
            "latency_s": self.latency_s,
            "throttled": self.throttled,
            "signals": self.signals,
        }
