"""The deadline's bound: a call with ``deadline=D`` returns within D + 0.25 s.

Three ways a call can be kept waiting, each against a sandbox process of its own: a server
that never answers (its latency is longer than any deadline here), one that answers every
request 429 with a ``Retry-After`` longer than D, and a limiter that is saturated (told one
request per minute: the first call goes out, the others wait in it). cometkit runs in a worker
process with ``deadline: D``; the worker times every call and reports the longest one. Every
call must end -- a value or ``APITimeoutError`` -- within the bound.
"""

from __future__ import annotations

from typing import Any, Callable

from cometkit.sandbox import SandboxProcess

from .contenders import Spec
from .report import DEADLINE_SLACK_S
from .runner import Suite, measure

NAME = "deadline"
TITLE = "Deadline bound (a never-answering server, Retry-After > D, a saturated limiter)"

THREADS = 4
#: The deadline every call is given, and the slack the issue allows past it.
DEADLINE_S = 2.0
SLACK_S = DEADLINE_SLACK_S
#: Longer than the deadline by far: a server waiting this long never answers in time.
NEVER_S = 60.0

#: (key, case, sandbox settings, cometkit plugins)
CASES = (
    ("never-answers", "server never answers", {"latency_s": NEVER_S}, {}),
    ("retry-after", f"every answer 429, Retry-After: {NEVER_S:g} s",
     {"always_429": True, "retry_after_value_s": NEVER_S}, {}),
    ("saturated-limiter", "saturated limiter (told 1 request/min)", {},
     {"limiter": {"requests_per_minute": 1, "adaptive": False}}),
)


def run(quick: bool, log: Callable[[str], Any]) -> Suite:
    calls = 4 if quick else 12
    suite = Suite()
    for key, case, sandbox_settings, plugins in CASES:
        with SandboxProcess(**sandbox_settings) as sandbox:
            spec = Spec("cometkit", sandbox.base_url, calls, THREADS, plugins=plugins,
                        deadline_s=DEADLINE_S)
            row = measure(sandbox, NAME, key, spec, label=f"cometkit, deadline {DEADLINE_S:g} s",
                          log=log, timeout_s=60.0 + calls * DEADLINE_S)
        row.deadline_s = DEADLINE_S
        row.info["case"] = case
        suite.rows.append(row)
    _checks(suite)
    return suite


def _checks(suite: Suite) -> None:
    bound = DEADLINE_S + SLACK_S
    for row in suite.rows:
        longest = row.info.get("max_call_s")
        case = row.info["case"]
        suite.check(f"{case}: every call ends within D + {SLACK_S:g} s ({bound:g} s)",
                    "no call timed" if longest is None else f"longest {longest:.3f} s",
                    longest is not None and longest <= bound)
        others = {name: n for name, n in row.errors.items() if name != "APITimeoutError"}
        suite.check(f"{case}: a call ends with its answer or APITimeoutError",
                    f"{row.ok} ok, errors {dict(row.errors)}", not others)
