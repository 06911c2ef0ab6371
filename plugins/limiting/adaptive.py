"""Learning, from the answers to our own attempts, how hard a server lets us push.

One :class:`AdaptiveControl` per model lane of the ``limiter`` plugin. It never blocks and
never reads a clock: the limiter hands it ``now`` and asks it when the next admission may go
out. A server can refuse for several reasons, and each is met differently:

- **Concurrency** (AIMD, as Netflix's concurrency-limits does on clients). It starts at
  :data:`INITIAL_LIMIT` and grows by one per success until the first signal (slow start:
  doubling every round trip), so that a fresh client meets a limit with a handful of calls in
  flight rather than all of its threads. A 429 multiplies it by :data:`CONCURRENCY_BACKOFF`;
  it then grows back by one per *window* of successes, a window being as many successes as the
  current limit (about one round trip of calls). Growing per success would climb straight
  back into the wall.
- **A cap on calls in flight** (a 429 worded "parallel" or "concurrent", as LiteLLM's
  ``max_parallel_requests``): not a rate at all, and its ``Retry-After`` is typically a window
  length that has nothing to do with the wait. The allowed concurrency drops to one below the
  level that was refused and stays there (the *ceiling*, raised by one only after
  :data:`CEILING_PROBE_OKS` successes); there is no hold. An unworded cap is told by where it
  refuses: :data:`CAP_EVIDENCE` refusals in a row, each sent with more calls in flight than any
  accepted call ever had (a rate limit also refuses at levels it accepts).
- **Send rate**: a server that answers in 10 ms still receives 100 calls/s at concurrency 1, so
  when the server's limit is a rate, concurrency alone cannot meet it. After a 429 the control
  measures what the server *accepted* since it last learned (successes per second of busy
  time, holds included, over at least :data:`MIN_MEASURE_S`) and sends at that rate. Then the
  rate rises while successes continue -- slowly at first (:data:`RATE_GROWTH_PER_S`), faster the
  longer no signal comes (:data:`RATE_ACCELERATION_PER_S`). The idea is botocore's adaptive
  (CUBIC) token bucket, with the measured rate standing in for CUBIC's guess of where the wall
  is. When nothing can be measured yet, or the server accepted more than we sent (a burst it
  had saved), the rate is cut multiplicatively (:data:`RATE_BACKOFF`), never below
  :data:`RATE_FLOOR` of the refused rate at once, and never below ``rate_floor_per_s`` (a rate
  the user configured) until the server keeps refusing at that rate.
- **Windows**: fixed windows (a quota per W seconds, from the first request of the window, as
  LiteLLM's proxy counts) and calendar minutes (as LiteLLM's router counts rpm per UTC minute).
  A window is recognised from what it does: the same ``Retry-After`` repeated on refusals
  seconds apart is a *period*, not a fresh wait (LiteLLM says the window's length, not the time
  left); acceptance that comes back exactly when a wall-clock minute turns is a calendar minute.
  Once a window is known, its quota (what it accepted last time) goes out together when it
  opens, and nothing is sent into a closed window: no pacing that wastes half of it, no probes.

Every refusal of a rate **holds** the lane: for the server's hint (measured from the start of
the current window when the hint is a period), or, with no hint, for :data:`DEFAULT_HOLD_S`,
then 2 s, then until the next turn of the wall-clock minute (where calendar minutes reopen);
no hint-less hold runs past that turn. When the hold ends the lane is *half-open*: one probe
goes out, and the others wait for its answer, so a closed limit sees one attempt per hold, not one
per waiting call. A refused probe holds again; an accepted one reopens the lane, and the first
admissions after it go out **paced** (one every ``latency / allowed concurrency``) unless a
window is known.

A success whose remaining requests (any header family the core reads) are at most
:data:`LOW_REMAINING_FRACTION` of the limit is a *soft* signal: the rate drops by
:data:`SOFT_BACKOFF` before the 429 arrives, without a hold.

Only one signal per round trip counts: a 429 for an attempt sent before the last signal is an
echo of the same burst, not news, so a burst of 429s cuts once.

Why this module is over 400 lines: :class:`AdaptiveControl` is one state machine, not several
controllers side by side: every admission and answer reads and writes one state -- a hold ends
in a probe whose answer reopens the rate, a known window changes what a hold and a hint mean, a
cap on calls in flight changes what a refusal teaches the rate. Its parts that have one job each
are mixins: learning the rates (:mod:`._adaptive_rates`), holds and windows
(:mod:`._adaptive_windows`), caps on calls in flight (:mod:`._adaptive_caps`) and sharing with a
fleet (:mod:`._adaptive_fleet`); the numbers are in :mod:`._adaptive_constants`. What stays here
is the state itself (declared once, in ``__init__``) and the transitions that tie the parts
together: admission, the answer to an attempt, a refusal, a success. What differs between the
stores (where state lives, how a fleet shares it) lives in the stores.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

from cometkit import AttemptResult
from cometkit.hints import RateLimitHints, parse_hints

from ._adaptive_caps import InFlightCaps
from ._adaptive_constants import CAP_EVIDENCE as CAP_EVIDENCE
from ._adaptive_constants import (
    CEILING_PROBE_OKS,
    CONCURRENCY_BACKOFF,
    DEFAULT_HOLD_S,
    FIRST_EVIDENCE_S,
    INITIAL_LIMIT,
    LATENCY_SMOOTHING,
    LOW_REMAINING_FRACTION,
    MAX_HOLD_S,
    MIN_MEASURE_S,
    MIN_RATE_PER_S,
    MINUTE_AFTER_PROBES,
    PACING_HEADROOM,
    PROBE_TIMEOUT_S,
    RATE_ACCELERATION_PER_S,
    RATE_BACKOFF,
    RATE_FLOOR,
    RATE_GROWTH_PER_S,
    SOFT_BACKOFF,
    SOFT_SIGNAL_INTERVAL_S,
    STORM_HORIZON_S,
)
from ._adaptive_constants import FLOOR_REFUSALS as FLOOR_REFUSALS
from ._adaptive_constants import HOLD_GROWTH as HOLD_GROWTH
from ._adaptive_constants import MIN_PERIOD_S as MIN_PERIOD_S
from ._adaptive_constants import MIN_SENT_SPAN_S as MIN_SENT_SPAN_S
from ._adaptive_constants import MINUTE_SLACK_S as MINUTE_SLACK_S
from ._adaptive_constants import PERIOD_EVIDENCE_S as PERIOD_EVIDENCE_S
from ._adaptive_constants import WINDOW_SLACK_S as WINDOW_SLACK_S
from ._adaptive_fleet import FleetSharing
from ._adaptive_rates import RateLearning
from ._adaptive_windows import WindowRecognition

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
    "MINUTE_AFTER_PROBES",
    "MAX_HOLD_S",
    "MIN_RATE_PER_S",
    "MIN_MEASURE_S",
    "LOW_REMAINING_FRACTION",
    "STORM_HORIZON_S",
]

logger = logging.getLogger("cometkit.limiter")


class AdaptiveControl(RateLearning, WindowRecognition, InFlightCaps, FleetSharing):
    """Allowed concurrency, send rate, holds, probes and windows of one lane.

    :param max_limit: the configured concurrency of the lane: the limit never grows past it.
    :param now: the clock's ``monotonic()`` at creation.
    :param rate_floor_per_s: a configured send rate the learned rate may not undercut (until
        the server keeps refusing at it); ``None``: no floor.
    :param window_s: a configured window: its quota goes out together when it opens.
    :param window_aligned: the configured window is aligned to the wall clock (calendar).
    :param window_quota: calls per configured window.
    :param wall_offset: ``clock.time() - clock.monotonic()``, so that a window following the
        wall clock is aligned from the first call (else it is known after the first answer).
    """

    def __init__(self, max_limit: int, now: float, *, rate_floor_per_s: Optional[float] = None,
                 window_s: Optional[float] = None, window_aligned: bool = False,
                 window_quota: Optional[int] = None,
                 wall_offset: Optional[float] = None) -> None:
        self.max_limit = int(max_limit)
        #: Allowed concurrency (a float so that repeated cuts and growth stay exact).
        self.limit = float(min(self.max_limit, INITIAL_LIMIT))
        #: The concurrency a cap on calls in flight refused, less one; ``None`` until one did.
        self.ceiling: Optional[int] = None
        #: The most calls in flight (at its admission) that an accepted attempt had, and the
        #: unworded refusals in a row above that level (evidence of a cap on calls in flight).
        self._max_ok_level = 0
        self._cap_evidence = 0
        self._cap_inferred = False
        self._rate_before_evidence: Optional[float] = None
        #: Learned send rate in calls per second; ``None`` until a signal taught one.
        self.rate_per_s: Optional[float] = None
        self.rate_floor_per_s = rate_floor_per_s
        #: No admission before this ``monotonic()`` time (the server's hint, or a probe hold).
        self.hold_until = -math.inf
        #: Smoothed duration of answered attempts, in seconds.
        self.latency_s: Optional[float] = None
        #: 429 answers seen, and congestion signals acted on (429 bursts and soft signals).
        self.throttled = 0
        self.signals = 0
        #: ``monotonic()`` of the last accepted attempt's answer (``None``: none yet).
        self.last_ok_at: Optional[float] = None
        self._first_refusal_at: Optional[float] = None
        #: A known window: its length, whether it follows the wall clock, and its quota.
        self.window_s = window_s
        self.window_aligned = window_aligned
        self.window_quota = window_quota
        self._window_configured = window_s is not None
        #: The window, and the ceiling, were taken from the fleet (:meth:`adopt`), not met.
        self._window_adopted = False
        #: A refusal at a counted rank fixed the window's quota (see :meth:`_window_ranked`).
        self._quota_settled = False
        self._ceiling_adopted = False
        self._window_end = -math.inf
        self._window_admitted = 0
        #: ``time() - monotonic()``, for wall-clock minutes.
        self._wall_offset = wall_offset
        self._slow_start = True
        self._next_send_at = -math.inf
        self._last_signal_at = -math.inf
        self._ok_in_window = 0
        self._ok_since_signal = 0
        self._ok_since_ceiling = 0
        self._paced_left = 0
        self._learn_pending = False
        self._rate_at_signal: Optional[float] = None
        self._anchor_rate = 0.0
        self._floor_refusals = 0
        # Half-open state after a hold: a probe goes out alone.
        self._half_open = False
        self._probe_deadline: Optional[float] = None
        self._failed_probes = 0
        self._minute_probe = False
        # The current run of acceptances: when it started and how many of its calls were ok.
        self._run_started_at: Optional[float] = None
        self._run_ok = 0
        self._last_hint: Optional[float] = None
        self._last_hint_at = -math.inf
        # What the server accepted since the rate was last learned, over busy time only.
        self._epoch_ok = 0
        self._epoch_sent = 0
        self._epoch_busy_start = 0.0
        self._busy_s = 0.0
        self._busy_mark = now
        self._busy = False
        #: Learned token rate (tokens per second), from 429s that refuse for tokens; ``None``
        #: until one taught it. Measured like the send rate, over the tokens the server
        #: charged for the calls it accepted.
        self.token_rate_per_s: Optional[float] = None
        self._token_anchor = 0.0
        self._token_rate_at_signal: Optional[float] = None
        self._token_learn_pending = False
        self._stated_token_rate: Optional[float] = None
        self._epoch_ok_tokens = 0
        self._epoch_sent_tokens = 0
        self._token_epoch_busy_start = 0.0

    # -- admission -----------------------------------------------------------------------------

    def allowed(self) -> int:
        """How many attempts of this lane may be in flight now."""
        allowed = max(1, int(self.limit))
        return allowed if self.ceiling is None else min(allowed, self.ceiling)

    def ready_at(self, now: Optional[float] = None) -> float:
        """Earliest ``monotonic()`` time of the next admission (hold, probe, window, pacing);
        ``math.inf`` when only an answer can open the lane (a probe is out)."""
        if now is None:
            now = self._busy_mark
        if self._probe_deadline is not None:
            if now < self._probe_deadline:
                return max(self.hold_until, self._probe_deadline)
            self._probe_deadline = None  # the probe is lost: let another go
        if self.window_quota is not None and self.window_s is not None:
            if now < self._window_end and self._window_admitted >= self.window_quota:
                return self._window_end
            return self.hold_until  # a window's quota goes out together, not paced
        return max(self.hold_until, self._next_send_at)

    def on_admit(self, now: float, tokens: int = 0) -> bool:
        """An attempt of this lane (estimated at ``tokens``) was admitted at ``now``; ``True``
        if it is the probe of a half-open lane (its answer decides whether the lane reopens)."""
        self._epoch_sent += 1
        self._epoch_sent_tokens += tokens
        if self._learn_pending and now >= self.hold_until:
            self._learn_rate(now)
        if self._token_learn_pending and now >= self.hold_until:
            self._learn_token_rate(now)
        if self.window_s is not None:
            if now >= self._window_end:
                self._open_window(now)
            self._window_admitted += 1
        elif self._run_started_at is None:
            self._run_started_at = now
        probe = False
        if self._half_open:
            probe = True
            self._probe_deadline = now + max(PROBE_TIMEOUT_S, 4.0 * (self.latency_s or 0.0))
        gap = 1.0 / self.rate_per_s if self.rate_per_s else 0.0
        if self.latency_s:
            headroom = PACING_HEADROOM
            if self._paced_left > 0:  # just after a hold: one per latency / allowed
                self._paced_left -= 1
                headroom = 1.0
            gap = max(gap, self.latency_s / (headroom * self.allowed()))
        if gap > 0.0:
            self._next_send_at = max(self._next_send_at, now) + gap
        return probe

    def note_demand(self, now: float, busy: bool) -> None:
        """Whether the lane has attempts in flight or waiting, from ``now`` on."""
        if self._busy:
            self._busy_s += now - self._busy_mark
        self._busy_mark = now
        self._busy = busy

    def accepting(self, now: float) -> bool:
        """Whether the server accepted an attempt recently enough that a refused call should
        wait its turn rather than spend its attempts (see :data:`STORM_HORIZON_S`)."""
        if self.last_ok_at is None:  # the benefit of the doubt: one wave, for a moment
            first = self._first_refusal_at
            return (first is not None and now - first <= FIRST_EVIDENCE_S
                    and self.throttled <= self.max_limit)
        horizon = max(STORM_HORIZON_S, 2.0 * (self.window_s or 0.0))
        return now - self.last_ok_at <= horizon

    # -- outcomes ------------------------------------------------------------------------------

    def on_result(self, result: AttemptResult, now: float,
                  wall_time: Callable[[], float], *, probe: bool = False,
                  in_flight: Optional[int] = None, charged_tokens: int = 0,
                  window_rank: int = 0) -> Optional[str]:
        """Learn from an attempt that ended at ``now``.

        :param wall_time: the clock's ``time()`` (HTTP dates, wall-clock minutes).
        :param probe: the attempt was the probe of a half-open lane.
        :param in_flight: attempts of the lane in flight when it was admitted, itself included.
        :param charged_tokens: tokens the server charged for it (prompt it counted plus the
            larger of the reserved ``max_tokens`` and the answer), 0 when unknown.
        :param window_rank: its place among the admissions of the known window, where a store
            counts them over a whole fleet (0: not counted). An accepted rank says the quota
            is at least that; a refused one, that it is less -- exact where this process's
            own count of acceptances sees only its share.
        :returns: for a 429, the kind of limit it was read as (``rate``, ``window``,
            ``tokens`` or ``concurrency``); else ``None``.
        """
        status = result.status_code
        if probe:
            self._probe_deadline = None
        if status is None:  # no answer: says nothing about the server's limits
            return None
        self._wall_offset = wall_time() - now
        duration = max(0.0, result.duration_s)
        if self.latency_s is None:
            self.latency_s = duration
        else:
            self.latency_s += LATENCY_SMOOTHING * (duration - self.latency_s)
        hints = result.hints
        if hints is None:
            hints = parse_hints(result.headers, wall_time())
        if window_rank and self.window_s is not None and not self._window_configured:
            self._window_ranked(result, window_rank, hints)
        if status == 429:
            return self._throttled(result, hints, now, probe, in_flight, ranked=window_rank > 0)
        if result.accepted:
            if in_flight is not None and in_flight > self._max_ok_level:
                self._max_ok_level = in_flight
            self._succeeded(result, hints, now, probe, ranked=window_rank > 0)
            self._tokens_accepted(charged_tokens)
        elif probe:  # an error of another kind: the next admission probes again
            pass
        return None

    def _throttled(self, result: AttemptResult, hints: RateLimitHints, now: float,
                   probe: bool, in_flight: Optional[int], ranked: bool = False) -> str:
        self.throttled += 1
        if self.last_ok_at is None and self._first_refusal_at is None:
            self._first_refusal_at = now
        if hints.refusal == "concurrency":
            return self._capped(result, in_flight)
        if hints.refusal == "quota":  # a spent quota: no limit to hold or learn from
            return "quota"
        kind = "tokens" if hints.refusal == "tokens" else "rate"
        echo = result.started_at < self._last_signal_at and not probe
        if self._above_accepted(hints, in_flight, now, echo):
            return self._capped(result, in_flight)
        if echo:
            return "window" if self.window_s is not None else kind
        hold_s, kind = self._hold_for(hints.wait_s, now, probe, kind)
        if ranked and kind == "window":
            # The store counts the fleet's window (its quota now below this refused rank):
            # it holds every process until the window it saw open ends, a better clock
            # than this process's own guess at when the window began.
            hold_s = 0.0
        self.hold_until = max(self.hold_until, now + hold_s)
        if self.window_s is not None and self._run_ok and not ranked:
            self.window_quota = self._run_ok  # what this window really accepted (so far)
        # A known window reopens with its whole quota at once; anything else is probed first
        # -- unless nothing is accepted at all (a storm): then the retry policy ends the calls.
        self._half_open = (kind != "window" or self.window_quota is None) and \
            self.accepting(now)
        before = self.allowed()
        # Only a refusal after some acceptance says where the server's rate is: a server that
        # refuses everything (a quota, an outage) must not drive the rate to a crawl.
        # A token refusal teaches a token rate, not a request rate.
        self._learn_pending = self._ok_since_signal > 0 and kind == "rate"
        if kind == "tokens":
            self._token_learn_pending = self._ok_since_signal > 0
            self._token_rate_at_signal = self.token_rate_per_s
        self._signal(now)
        if kind != "window":
            self.limit = max(1.0, self.limit * CONCURRENCY_BACKOFF)
        self._ok_in_window = 0
        self._paced_left = self.allowed()
        logger.info("429 for model=%s (%s): concurrency %d -> %d, holding admissions %.2f s",
                    result.request.model or "-", kind, before, self.allowed(), hold_s)
        return kind

    def stated_exhausted(self, now: float) -> None:
        """An accepted answer said no request remains, and not when more will: hold as a
        hint-less 429 would (then probe) -- without spending the 429 to learn it."""
        if now < self.hold_until or self._half_open:
            return
        hold_s, _ = self._hold_for(None, now, False, "rate")
        self.hold_until = now + hold_s
        self._half_open = self.accepting(now)
        self._signal(now)  # answers to attempts sent before this do not reopen the lane
        logger.info("the server says no request remains: holding admissions %.2f s", hold_s)

    def _succeeded(self, result: AttemptResult, hints: RateLimitHints, now: float,
                   probe: bool, ranked: bool = False) -> None:
        self.last_ok_at = now
        self._epoch_ok += 1
        self._ok_since_signal += 1
        self._ok_in_window += 1
        if self._half_open and (probe or result.started_at >= self._last_signal_at):
            self._reopen(now, result.started_at)  # this success is the new run's first
        elif (self._run_started_at is not None
              and result.started_at >= self._run_started_at - 1e-9):
            self._run_ok += 1
            if (self.window_quota is not None and not self._window_configured and not ranked
                    and self._run_ok > self.window_quota):
                self.window_quota = self._run_ok  # late answers of the window's own calls
        if self.ceiling is not None:
            self._ok_since_ceiling += 1
            if self._ok_since_ceiling >= CEILING_PROBE_OKS and self.ceiling < self.max_limit:
                self.ceiling += 1
                self._ok_since_ceiling = 0
        if self._slow_start or self._ok_in_window >= self.limit:
            self._ok_in_window = 0
            self.limit = min(float(self.max_limit), self.limit + 1.0)
        remaining, limit = hints.remaining_requests, hints.limit_requests
        if (remaining is not None and limit and remaining <= LOW_REMAINING_FRACTION * limit
                and result.started_at >= self._last_signal_at
                and now - self._last_signal_at >= SOFT_SIGNAL_INTERVAL_S
                and self.window_s is None):
            self._signal(now)
            if self.rate_per_s is not None:
                self._set_rate(self.rate_per_s * SOFT_BACKOFF)
            else:
                measured = self._measured_rate(now)
                if measured is not None:
                    self._set_rate(measured)
            logger.debug("model=%s: %d of %d requests remain; send rate now %s/s",
                         result.request.model or "-", remaining, limit,
                         "-" if self.rate_per_s is None else f"{self.rate_per_s:.2f}")
        else:
            self._grow_rate(1)

    def _signal(self, now: float) -> None:
        self.signals += 1
        self._ok_since_signal = 0
        self._slow_start = False
        self._last_signal_at = now
        self._rate_at_signal = self.rate_per_s

    # -- reporting -----------------------------------------------------------------------------

    def hold_remaining_s(self, now: float) -> Optional[float]:
        """Seconds until the lane may admit again, if a hold or a closed window says so."""
        until = self.ready_at(now)
        if math.isinf(until) or until <= now:
            return None
        return until - now

    def held_s(self, now: float) -> float:
        """Seconds the hold after a refusal lasts from ``now`` (0 when none)."""
        return max(0.0, self.hold_until - now)

    def snapshot(self, now: float) -> dict[str, Any]:
        """What the control has learned, for :meth:`AdmissionLimiter.stats` and logs."""
        return {
            "limit": self.allowed(),
            "rate_per_s": self.rate_per_s,
            "hold_remaining_s": self.held_s(now),
            "latency_s": self.latency_s,
            "throttled": self.throttled,
            "signals": self.signals,
            "ceiling": self.ceiling,
            "window_s": self.window_s,
            "window_quota": self.window_quota,
            "token_rate_per_s": self.token_rate_per_s,
        }
