"""Injected faults: 5% each of 500, 503 and connection reset.

With temporary failures opted in (``retry_on: [429, 500, 503, connect, read]``) cometkit must
finish every call. With its defaults only 429 is retried, so every injected fault must surface
as its own typed exception, and the server must see exactly one attempt per call. Each
contender gets a fresh sandbox with the same seed, so the fault draws are the same sequence.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from cometkit.sandbox import SandboxProcess

from .contenders import Spec
from .runner import Row, Suite, measure

NAME = "faults"
TITLE = "Faults (5% each of 500, 503, connection reset)"

THREADS = 8
SANDBOX = dict(faults={"500": 0.05, "503": 0.05, "reset": 0.05}, seed=20240501)
#: The exception each injected fault must become when it is not retried.
EXPECTED_ERROR = {"500": "InternalServerError", "503": "InternalServerError",
                  "reset": "APIConnectionError"}
OPT_IN = {"backoff": {"retry_on": [429, 500, 503, "connect", "read"]}}

#: (key, contender, label or None, plugins section, driver)
RUNS = (
    ("requests", "requests", "requests Session.post (no retry)", {}, "map"),
    ("cometkit-opt-in", "cometkit", "cometkit (retry_on 429, 500, 503, connect, read)",
     OPT_IN, "map"),
    # The same through the caller's own ThreadPoolExecutor of 8 threads calling create(): a
    # call sleeping before a retry blocks its caller's thread, by nature (client.map's workers
    # give their place away instead).
    ("cometkit-opt-in-threads", "cometkit",
     "cometkit (retry_on ...; ThreadPoolExecutor, not client.map)", OPT_IN, "threads"),
    ("cometkit-defaults", "cometkit", "cometkit (defaults: 429 only)", {}, "map"),
    ("openai", "openai", None, {}, "map"),
)


def run(quick: bool, log: Callable[[str], Any]) -> Suite:
    calls = 200 if quick else 500
    suite = Suite()
    for key, client, label, plugins, driver in RUNS:
        with SandboxProcess(**SANDBOX) as sandbox:
            spec = Spec(client, sandbox.base_url, calls, THREADS, plugins=plugins, driver=driver)
            suite.rows.append(measure(sandbox, NAME, key, spec, label=label,
                                      baseline=key == "requests", log=log))
    _checks(suite)
    return suite


def _resets(row: Row) -> int:
    return row.faults.get("reset", 0)


def _checks(suite: Suite) -> None:
    for key in ("cometkit-opt-in", "cometkit-opt-in-threads"):
        opted = suite.row(key)
        suite.check(f"{opted.client}: 0 failed",
                    f"{opted.failed} failed; {sum(opted.faults.values())} faults injected",
                    opted.failed == 0)
    # Issue 14's bound: waiting out back-offs does not occupy the workers of client.map.
    opted, sdk = suite.row("cometkit-opt-in"), suite.row("openai")
    suite.check(f"{opted.client}: wall <= the openai SDK's own retries",
                f"{opted.wall_s:.2f} s vs {sdk.wall_s:.2f} s", opted.wall_s <= sdk.wall_s)
    defaults = suite.row("cometkit-defaults")
    expected: collections.Counter = collections.Counter()
    for kind, count in defaults.faults.items():
        expected[EXPECTED_ERROR[kind]] += count
    suite.check("cometkit (defaults): each fault surfaces as its typed error",
                f"errors {dict(defaults.errors)} for faults {defaults.faults}",
                dict(defaults.errors) == dict(expected))
    suite.check("cometkit (defaults): attempts == calls",
                f"{defaults.attempts} attempts for {defaults.calls} calls",
                defaults.attempts == defaults.calls)
    # A reset kills its connection: the client must open a new one for each.
    suite.check_connections(allowance=_resets, why=" (+1 per reset)")
