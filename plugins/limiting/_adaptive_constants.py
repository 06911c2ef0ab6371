"""The tuned numbers of the adaptive policy (:mod:`.adaptive`), each with what it means.

One module for them so that every part of :class:`~.adaptive.AdaptiveControl` (its mixins
included) reads the same values; :mod:`.adaptive` re-exports them all, its public import path.
They are tuned against the benchmarks: change one only with them.
"""

from __future__ import annotations

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
