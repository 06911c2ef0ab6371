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
controllers side by side. Concurrency, send and token rates, windows, holds and probes are one
state read and written by every admission and answer -- a hold ends in a probe whose answer
reopens the rate, a known window changes what a hold and a hint mean, a cap on calls in flight
changes what a refusal teaches the rate -- so its transitions stay together here; what differs
between the stores (where state lives, how a fleet shares it) lives in the stores.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional

from cometkit import AttemptResult
from cometkit.hints import RateLimitHints, parse_hints

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

#: Allowed concurrency after a 429: the limit times this (never below 1).
CONCURRENCY_BACKOFF = 0.7
#: Send rate after a signal, as a share of the refused rate, when the measurement cannot be
#: used (too short yet, or the server accepted more than we were sending).
RATE_BACKOFF = 0.7
#: While successes continue, the rate rises per second of sending by this share of the last
#: learned rate (growth is counted per success, so an idle client does not grow) ...
RATE_GROWTH_PER_S = 0.1
#: ... plus this share of what it has grown since: slow just above the rate that was measured,
#: faster the longer no signal comes, in case the measurement undershot.
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
#: Never cut a learned rate below this share of the rate that was refused in one step.
RATE_FLOOR = 0.5
#: First hold after a 429 that carries no usable hint, in seconds; :data:`HOLD_GROWTH` times
#: longer after each refused probe (a limit that stays closed is probed ever more rarely).
DEFAULT_HOLD_S = 0.25
#: Growth of a hold per refused probe: a hint-less one goes 0.25 s, 2 s, then (after
#: :data:`MINUTE_AFTER_PROBES` refused probes) to the turn of the wall-clock minute; a hinted
#: one that keeps being refused waits at least as long.
HOLD_GROWTH = 8.0
#: Refused hint-less probes after which the next probe waits for the turn of the minute: a
#: limit still closed 2.25 s after its first refusal is most often a calendar minute (LiteLLM's
#: router counts rpm per UTC minute), which then costs its first refusal and two probes, not a
#: probe every few seconds. A smooth bucket's first probe (after 0.25 s) is accepted and never
#: meets the longer holds; a slow one without hints waits for the minute once, then is paced.
MINUTE_AFTER_PROBES = 2
#: Longest hold, whatever the server says: the retry policy decides whether a call waits
#: longer; other calls should not queue for minutes behind one hint.
MAX_HOLD_S = 60.0
#: A hint-less hold never runs past the next wall-clock minute by more than this: calendar
#: minutes reopen there.
MINUTE_SLACK_S = 0.05
#: Added to a window's computed end: the server opened it when our first request *arrived*.
WINDOW_SLACK_S = 0.05
#: A hint repeated on refusals at least this far apart is a period (the time left would have
#: shrunk).
PERIOD_EVIDENCE_S = 1.0
#: Shortest hint taken for a period: a server rounding a short wait up to whole seconds
#: repeats ``Retry-After: 1`` without meaning a window.
MIN_PERIOD_S = 2.0
#: The learned rate never falls below this (calls per second).
MIN_RATE_PER_S = 0.5
#: A measurement over less busy time than this is a burst, not a rate.
MIN_MEASURE_S = 1.0
#: Shortest span a send rate is computed over (a first 429 within a few round trips).
MIN_SENT_SPAN_S = 0.1
#: A success reporting fewer remaining requests than this share of the limit is a soft signal.
LOW_REMAINING_FRACTION = 0.1
#: At most one soft signal per this many seconds.
SOFT_SIGNAL_INTERVAL_S = 1.0
#: Weight of the newest attempt in the smoothed attempt duration.
LATENCY_SMOOTHING = 0.2
#: A probe that has not answered after this long (or 4 latencies, if longer) lets another go.
PROBE_TIMEOUT_S = 2.0
#: The server counts as still *accepting* while its last acceptance is at most this old (or two
#: windows, if longer): long enough to span a calendar minute and its probe.
STORM_HORIZON_S = 65.0
#: Before the server accepted anything, refusals within this long of the first one (and no
#: more than one wave of them: the lane's concurrency) still count as "not now" -- a fresh
#: client's first wave meets the limit before any answer is back; after that, a server that
#: never accepted is in a storm.
FIRST_EVIDENCE_S = 2.0
#: Successes without a concurrency refusal after which a remembered ceiling rises by one.
CEILING_PROBE_OKS = 100
#: Refusals in a row, none worded, each sent with more calls in flight than any accepted call
#: had, before the lane takes the limit for a cap on calls in flight (nginx ``limit_conn``
#: says nothing but "429"). A rate limit refuses at levels it also accepts, which resets it.
CAP_EVIDENCE = 2
#: Refusals at a configured rate, with the burst already at its smallest, before adaptive mode
#: may send below that rate.
FLOOR_REFUSALS = 2


class AdaptiveControl:
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

    def _open_window(self, now: float) -> None:
        """A new window starts with this admission (or at the wall-clock boundary)."""
        assert self.window_s is not None
        self._window_admitted = 0
        self._run_started_at = now
        self._run_ok = 0
        self._window_end = now + self.window_s + WINDOW_SLACK_S
        if self.window_aligned and self._wall_offset is not None:
            wall = now + self._wall_offset
            self._window_end = (now + self.window_s - wall % self.window_s) + WINDOW_SLACK_S

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

    def _window_ranked(self, result: AttemptResult, rank: int, hints: RateLimitHints) -> None:
        """The quota of a learned window, from where in the fleet's window this answer's
        attempt went out (see :meth:`on_result`). A refused rank fixes the quota (one less);
        until one has, the last rank a window allowed, accepted, is taken for one short of
        the quota: the quota first learned counts the fleet's acceptances as far as this
        process had heard of them, which may be too few, and a quota never tried cannot be
        found too small (one refusal, once, settles it)."""
        if result.status_code == 429 and hints.refusal in (None, "requests"):
            if self.window_quota is None or rank - 1 < self.window_quota:
                self.window_quota = max(1, rank - 1)
            self._quota_settled = True
        elif result.accepted and self.window_quota is not None:
            if rank > self.window_quota:
                self.window_quota = rank
            if rank == self.window_quota and not self._quota_settled:
                self.window_quota = rank + 1

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

    def _hold_for(self, hint: Optional[float], now: float, probe: bool,
                  kind: str) -> tuple[float, str]:
        """How long to hold after this refusal, and whether it showed a window."""
        wall = now + (self._wall_offset or 0.0)
        if probe:
            self._failed_probes += 1
        if hint is None:
            self._last_hint = None
            hold = (DEFAULT_HOLD_S * HOLD_GROWTH ** self._failed_probes
                    if self._failed_probes < MINUTE_AFTER_PROBES else MAX_HOLD_S)
            to_minute = 60.0 - wall % 60.0 + MINUTE_SLACK_S
            self._minute_probe = to_minute <= hold
            return min(hold, to_minute), ("window" if self.window_s is not None else kind)
        if probe and self._failed_probes > 1:
            # A probe refused again: the hint was not enough; probe ever more rarely.
            hint = max(hint, DEFAULT_HOLD_S * HOLD_GROWTH ** min(self._failed_probes - 1, 8))
        repeated = (self._last_hint is not None and abs(hint - self._last_hint) < 1e-3
                    and now - self._last_hint_at >= PERIOD_EVIDENCE_S
                    and hint >= MIN_PERIOD_S)
        self._last_hint, self._last_hint_at = hint, now
        if (not repeated and self.window_s is not None and not self._window_configured
                and abs(hint - self.window_s) >= 1e-3):
            logger.info("Retry-After %g s after a window of %g s was assumed: the hint is a "
                        "time left after all", hint, self.window_s)
            self.window_s = self.window_quota = None
            self._window_end = -math.inf
            self._quota_settled = False
        # A long hint that ends a run of acceptances is taken for a window's length until a
        # different hint says otherwise (then it was a time left, and one probe went early).
        tentative = (self.window_s is None and hint >= MIN_PERIOD_S and not probe
                     and abs(hint - round(hint)) < 1e-6  # windows are whole seconds
                     and self._ok_since_signal > 0 and self._run_started_at is not None)
        if (repeated or tentative) and not self._window_configured:
            if self.window_s != hint:
                logger.info("Retry-After %g s after a run of acceptances%s: taken for a window "
                            "of that length, counted from its first request", hint,
                            " (repeated)" if repeated else "")
            self.window_s, self.window_aligned = hint, False
        if self.window_s is not None and self._run_started_at is not None:
            end = self._run_started_at + self.window_s + WINDOW_SLACK_S
            if end > now:
                self._window_end = end
                return min(MAX_HOLD_S, end - now), "window"
        return min(MAX_HOLD_S, hint), kind

    def _above_accepted(self, hints: RateLimitHints, in_flight: Optional[int],
                        now: float, echo: bool) -> bool:
        """Whether this unworded 429 reads as a cap on calls in flight: sent with more in
        flight than any accepted call had, for the :data:`CAP_EVIDENCE`-th signal in a row (or
        once such a cap was inferred), while the server accepts fewer. Echoes of one burst
        count once: a slow start meets any limit at its highest level so far."""
        if hints.refusal is not None or in_flight is None or self._max_ok_level < 1:
            return False
        if in_flight <= self._max_ok_level or not self.accepting(now):
            self._cap_evidence = 0  # refused where it also accepts: a rate, not a cap
            return False
        if not echo:
            if self._cap_evidence == 0:
                self._rate_before_evidence = self.rate_per_s
            self._cap_evidence += 1
        if self._cap_inferred:
            return True
        if self._cap_evidence < CAP_EVIDENCE:
            return False
        logger.info("429s only with more than %d calls in flight: taken for a cap on calls "
                    "in flight", self._max_ok_level)
        self._cap_inferred = True
        # The refusals so far were read as a rate: undo what they taught (a send rate, a
        # hold, the cuts) and keep just below the refused level instead.
        self.rate_per_s = self._rate_before_evidence
        if self.rate_per_s is None:
            self.rate_per_s = self.rate_floor_per_s
        self._anchor_rate = self.rate_per_s or 0.0
        self._learn_pending = False
        self.hold_until = min(self.hold_until, now)
        self._half_open = False
        self.limit = float(max(self.limit, self._max_ok_level))
        return True

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

    def _capped(self, result: AttemptResult, in_flight: Optional[int]) -> str:
        """A cap on calls in flight refused: stay one below the refused level, no hold."""
        level = in_flight if in_flight is not None else self.allowed()
        ceiling = max(1, min(level - 1, self.allowed()))
        if self.ceiling is None or ceiling < self.ceiling:
            logger.info("429 for model=%s: the server caps calls in flight; keeping at most %d",
                        result.request.model or "-", ceiling)
            self.ceiling = ceiling
        self.limit = min(self.limit, float(self.ceiling))
        self._ok_since_ceiling = 0
        self._slow_start = False
        return "concurrency"

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

    def _grow_rate(self, successes: int) -> None:
        """The learned rate rises per success, by the share of a second of sending it took."""
        if self.rate_per_s is not None:
            growth_per_s = (RATE_GROWTH_PER_S * self._anchor_rate
                            + RATE_ACCELERATION_PER_S * (self.rate_per_s - self._anchor_rate))
            self.rate_per_s += successes * growth_per_s / self.rate_per_s

    def _reopen(self, now: float, sent_at: float) -> None:
        """The probe (or a later attempt) was accepted: the limit is open again."""
        self._half_open = False
        if (self._minute_probe and self.window_s is None and not self._window_configured
                and self._failed_probes > 0):
            logger.info("acceptance came back when the wall-clock minute turned: a limit per "
                        "calendar minute")
            self.window_s, self.window_aligned = 60.0, True
            self.window_quota = self._run_ok or None
        self._failed_probes = 0
        self._minute_probe = False
        if self.window_s is not None:
            previous_ok = self._run_ok
            if now >= self._window_end or self._window_end == -math.inf:
                self._open_window(sent_at)
                self._window_admitted = 1
                self._run_ok = 1
            if self.window_quota is None and previous_ok > 1:
                self.window_quota = previous_ok
        else:
            self._run_started_at = sent_at
            self._run_ok = 1

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

    def refused_at_floor(self) -> None:
        """The limiter saw a refusal at the configured rate with its burst already smallest:
        after :data:`FLOOR_REFUSALS` of them the server evidently allows less, so the floor
        goes."""
        self._floor_refusals += 1
        if self._floor_refusals >= FLOOR_REFUSALS and self.rate_floor_per_s is not None:
            logger.info("the server keeps refusing at the configured rate (%.2f/s): learning a "
                        "lower one", self.rate_floor_per_s)
            self.rate_floor_per_s = None

    def adopt_token_rate(self, rate_per_s: float) -> None:
        """The server states its token limit: spend tokens at that rate from now on (a token
        refusal can still teach a lower one). A stated value seen again changes nothing."""
        if self._stated_token_rate is not None and abs(rate_per_s - self._stated_token_rate) \
                <= 1e-6 * rate_per_s:
            return
        self._stated_token_rate = rate_per_s
        self.token_rate_per_s = self._token_anchor = rate_per_s

    def _tokens_accepted(self, charged: int) -> None:
        """An accepted call's tokens: measured, and the learned token rate grows by them."""
        if charged <= 0:
            return
        self._epoch_ok_tokens += charged
        rate = self.token_rate_per_s
        if rate is not None:  # growth per second of sending, as for the send rate
            growth_per_s = (RATE_GROWTH_PER_S * self._token_anchor
                            + RATE_ACCELERATION_PER_S * (rate - self._token_anchor))
            rate += growth_per_s * charged / rate
            if self._stated_token_rate is not None:  # what the server states is a ceiling
                rate = min(rate, self._stated_token_rate)
            self.token_rate_per_s = rate

    def _learn_token_rate(self, now: float) -> None:
        """Spend tokens at what the server accepted since the token rate was last learned;
        the same rules as :meth:`_learn_rate`, counted in tokens."""
        self._token_learn_pending = False
        self.note_demand(now, self._busy)
        busy_s = self._busy_s - self._token_epoch_busy_start
        before = self._token_rate_at_signal
        measured = (self._epoch_ok_tokens / busy_s
                    if self._epoch_ok_tokens and busy_s >= MIN_MEASURE_S else None)
        if measured is not None and (before is None or measured <= before):
            rate = measured if before is None else max(measured, before * RATE_FLOOR)
        elif before is not None:
            rate = before * RATE_BACKOFF
        elif self._epoch_sent_tokens:
            rate = RATE_BACKOFF * self._epoch_sent_tokens / max(busy_s, MIN_SENT_SPAN_S)
        else:
            return
        self.token_rate_per_s = self._token_anchor = max(1.0, rate)
        logger.debug("token rate %.0f/s (measured %s)", self.token_rate_per_s,
                     "-" if measured is None else f"{measured:.0f}/s")
        if measured is not None:
            self._epoch_ok_tokens = self._epoch_sent_tokens = 0
            self._token_epoch_busy_start = self._busy_s

    def _set_rate(self, rate: float) -> None:
        rate = max(MIN_RATE_PER_S, rate)
        if self.rate_floor_per_s is not None:
            rate = max(rate, self.rate_floor_per_s)
        self.rate_per_s = self._anchor_rate = rate

    # -- sharing: a store that keeps one lane's learning for a fleet of processes ------------

    def learned(self) -> dict[str, Any]:
        """What this lane has *learned*, for a store to share with other processes (see
        :meth:`adopt`): the send and token rates as last learned (not what they grew to
        since), a recognised window, and a ceiling on calls in flight. ``None`` for what it
        has not learned; a configured window is not learned and not shared."""
        learned_window = self.window_s is not None and not self._window_configured
        return {
            "rate_per_s": self._anchor_rate if self.rate_per_s is not None else None,
            "token_rate_per_s": (self._token_anchor if self.token_rate_per_s is not None
                                 else None),
            "window_s": self.window_s if learned_window else None,
            "window_aligned": self.window_aligned if learned_window else None,
            "window_quota": self.window_quota if learned_window else None,
            "window_settled": self._quota_settled if learned_window else None,
            "ceiling": self.ceiling,
        }

    def adopt(self, shared: Mapping[str, Any]) -> None:
        """Take in what another process of the fleet learned (its :meth:`learned`, or part of
        it). The rates are the fleet's (measured over what the whole fleet had accepted, see
        :meth:`accepted_elsewhere`), so they replace this lane's, growth starting afresh from
        them, as after a rate this lane learned itself. A window and a ceiling are taken only
        when this lane knows none (a process that met them knows its own better); once taken,
        they follow the fleet's: a newer quota or ceiling, and ``None`` for one the process
        that met it found wrong."""
        rate = shared.get("rate_per_s")
        if rate:
            self._set_rate(float(rate))
            self._slow_start = False
        token_rate = shared.get("token_rate_per_s")
        if token_rate:
            token_rate = max(1.0, float(token_rate))
            if self._stated_token_rate is not None:
                token_rate = min(token_rate, self._stated_token_rate)
            self.token_rate_per_s = self._token_anchor = token_rate
        window_s = shared.get("window_s")
        if window_s and self.window_s is None:
            self.window_s = float(window_s)
            self.window_aligned = bool(shared.get("window_aligned"))
            quota = shared.get("window_quota")
            self.window_quota = int(quota) if quota else None
            self._quota_settled = bool(shared.get("window_settled"))
            self._window_adopted = True
        elif "window_s" in shared and window_s is None and self._window_adopted:
            # The process that met it found it wrong (a hint that was a time left after all).
            self.window_s = self.window_quota = None
            self._window_end = -math.inf
            self._window_adopted = False
            self._quota_settled = False
        elif (shared.get("window_quota") and self.window_s is not None
              and not self._window_configured
              and (self._window_adopted or "window_s" not in shared
                   or abs(float(window_s or 0) - self.window_s) < 1e-3)):
            # one window, one quota for the fleet: the latest any process counted
            self.window_quota = int(shared["window_quota"])
        if (shared.get("window_settled") and self.window_s is not None
                and not self._window_configured
                and abs(float(shared.get("window_s") or self.window_s) - self.window_s) < 1e-3):
            self._quota_settled = True  # a refused rank somewhere in the fleet fixed it
        ceiling = shared.get("ceiling")
        if ceiling and (self.ceiling is None or self._ceiling_adopted):
            self.ceiling = max(1, min(int(ceiling), self.max_limit))
            self.limit = min(self.limit, float(self.ceiling))
            self._slow_start = False
            self._ceiling_adopted = True
        elif "ceiling" in shared and ceiling is None and self._ceiling_adopted:
            self.ceiling = None
            self._ceiling_adopted = False

    @property
    def window_quota_open(self) -> bool:
        """Whether a learned window's quota may still be found larger: no refused rank has
        fixed it yet (here or, once shared, anywhere in the fleet). Until then a call the
        quota turned away should look again soon, not sleep to the window's end: the quota
        rises with each accepted probe of one more."""
        return (self.window_s is not None and self.window_quota is not None
                and not self._quota_settled and not self._window_configured)

    def accepted_elsewhere(self, sent: int, accepted: int, sent_tokens: int = 0,
                           accepted_tokens: int = 0) -> None:
        """Attempts the rest of the fleet sent, and had accepted, while this lane was busy:
        counted in what the server accepted since the rate was last learned, so that what
        this lane measures and learns is the rate the server gives the *fleet* (which a store
        enforces fleet-wide), and growing the rates as this lane's own successes do."""
        self._epoch_sent += max(0, sent)
        self._epoch_sent_tokens += max(0, sent_tokens)
        if accepted > 0:
            self._epoch_ok += accepted
            self._ok_since_signal += accepted  # a refusal after them ends the fleet's run
            self._grow_rate(accepted)
            if self._run_started_at is not None:  # a window's quota is the fleet's
                self._run_ok += accepted
        self._tokens_accepted(accepted_tokens)

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
