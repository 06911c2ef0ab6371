"""Goodput under a rate limit the client is not told about.

The sandbox admits 20 calls per second per model (a bucket of 20), answers after 50 ms and
hints ``Retry-After`` in whole seconds. 16 threads send the calls. A perfect client spends
the burst at once and then one call per 50 ms, so the ideal wall time is
``(calls - burst) / rate + latency`` (~9 s for 200 calls), with no failure. Each contender
gets a fresh sandbox: the buckets start full every time.
"""

from __future__ import annotations

from typing import Any, Callable

from cometkit.sandbox import SandboxProcess

from .contenders import Spec
from .runner import Suite, measure

NAME = "goodput"
TITLE = "Goodput under a rate limit (20 calls/s, burst 20, 50 ms, Retry-After)"

RATE_PER_S = 20
BURST = 20
LATENCY_S = 0.05
THREADS = 16
SANDBOX = dict(rps=RATE_PER_S, burst=BURST, latency_s=LATENCY_S, retry_after="seconds")

#: (key, contender, label or None, plugins section)
RUNS = (
    ("requests", "requests", "requests Session.post (no retry)", {}),
    ("cometkit-defaults", "cometkit", "cometkit (defaults)", {}),
    ("cometkit-rpm", "cometkit", "cometkit (requests_per_minute: 1200)",
     {"limiter": {"requests_per_minute": RATE_PER_S * 60}}),
    ("openai", "openai", None, {}),
    ("openai-cometkit", "openai-cometkit", "openai SDK through cometkit (defaults)", {}),
    ("guide-429-loop", "guide-429-loop", None, {}),
    ("guide-semaphore", "guide-semaphore", None, {}),
    ("guide-both", "guide-both", None, {}),
)


def ideal_wall_s(calls: int) -> float:
    return max(0, calls - BURST) / RATE_PER_S + LATENCY_S


def run(quick: bool, log: Callable[[str], Any]) -> Suite:
    calls = 100 if quick else 200
    suite = Suite()
    for key, client, label, plugins in RUNS:
        with SandboxProcess(**SANDBOX) as sandbox:
            spec = Spec(client, sandbox.base_url, calls, THREADS, plugins=plugins)
            suite.rows.append(measure(sandbox, NAME, key, spec, label=label,
                                      ideal_wall_s=ideal_wall_s(calls),
                                      baseline=key == "requests", log=log))
    _checks(suite)
    return suite


def _checks(suite: Suite) -> None:
    for key, max_vs_ideal, max_429_share in (("cometkit-defaults", 1.15, 0.25),
                                             ("cometkit-rpm", 1.05, 0.02),
                                             ("openai-cometkit", 1.15, 0.25)):
        row = suite.row(key)
        share = row.rate_limited / row.calls
        suite.check(f"{row.client}: 0 failed", f"{row.failed} failed", row.failed == 0)
        suite.check(f"{row.client}: wall <= {max_vs_ideal:.2f}x ideal",
                    f"{row.wall_s:.2f} s = {row.vs_ideal:.2f}x of {row.ideal_wall_s:.2f} s",
                    row.vs_ideal <= max_vs_ideal)
        suite.check(f"{row.client}: 429 attempts <= {max_429_share:.0%} of calls",
                    f"{row.rate_limited} = {share:.1%}", share <= max_429_share)
    suite.check_connections()
