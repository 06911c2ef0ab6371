"""One contender in its own process: ``python -m benchmarks.worker '<spec as JSON>'``.

A process per contender keeps the CPU accounting clean (``getrusage(RUSAGE_SELF)`` counts this
client's threads and nothing else: the sandbox runs in another process) and keeps one
client's imports, threads and garbage out of the next one's numbers. The result is printed as
one JSON object on stdout.
"""

from __future__ import annotations

import collections
import json
import resource
import sys
import time
from typing import Any

from .contenders import Spec, make


def _cpu_s() -> tuple:
    """``(user, system)`` CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _reason(outcome: Any) -> str:
    if isinstance(outcome, BaseException):
        return type(outcome).__name__
    return str(outcome)


#: The longest a worker waits for ``Spec.start_at``: a later one is a mistake, not a plan.
MAX_START_WAIT_S = 120.0


def _wait_until(wall_time: float) -> None:
    """Sleep until ``time.time()`` reaches ``wall_time`` (bounded by MAX_START_WAIT_S)."""
    deadline = time.monotonic() + min(MAX_START_WAIT_S, max(0.0, wall_time - time.time()))
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def run(spec: Spec) -> dict:
    """Build the contender, warm it up, then time ``spec.calls`` calls and the close."""
    contender = make(spec)
    for i in range(spec.warmup):
        contender.call(-1 - i)
    errors: collections.Counter = collections.Counter()
    ok = 0
    if spec.start_at:
        _wait_until(spec.start_at)
    started_at = time.time()
    cpu_before, wall_before = _cpu_s(), time.perf_counter()
    for outcome in contender.run(range(spec.calls)):
        if outcome is None:
            ok += 1
        else:
            errors[_reason(outcome)] += 1
    contender.close()
    wall_s = time.perf_counter() - wall_before
    user_s, system_s = (after - before for after, before in zip(_cpu_s(), cpu_before))
    return {
        "ok": ok,
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "wall_s": wall_s,
        "started_at": started_at,
        "cpu_s": user_s + system_s,
        "system_s": system_s,
        "warmup": spec.warmup,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "info": contender.info,
    }


def main(argv: list) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks.worker '<spec as JSON>'", file=sys.stderr)
        return 2
    result = run(Spec(**json.loads(argv[0])))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
