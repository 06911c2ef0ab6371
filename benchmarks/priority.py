"""Priority lanes' bound: interactive calls overtake a batch that saturates the limit.

A batch saturates a 20 calls/s limit (the in-process limiter, told ``requests_per_minute:
1200``) from 16 threads, in the ``batch`` lane; meanwhile one interactive call a second goes
out in the ``interactive`` lane. The bound: the interactive calls' admission waits
(``queue_s``, read from the attempt records) are at most one send interval at p95, and the
batch still finishes within 1.1x of its ideal time -- its calls beyond the first second's
burst at the limit's rate less the interactive calls' share. A second row runs the same
workload with every call in one lane, to show what the interactive calls wait without lanes; a
third splits the batch and the interactive calls between two processes sharing a
``redis_limiter``: the interactive calls overtake the other process's batch.

Each run is a child process of its own (``python -m benchmarks.priority SPEC``) against a
sandbox process of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import cometkit
from cometkit.sandbox import SandboxProcess

from .runner import REPO_ROOT, BenchmarkError, Row, Suite, child_env, run_child, tail

# Redis runs the way the test suite runs it (one helper, in tests/), as in the limits suite.
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.append(str(REPO_ROOT / "tests"))

from redis_server import REDIS_SERVER, RedisServer

NAME = "priority"
TITLE = "Priority lanes (a batch saturating 20 calls/s from 16 threads, interactive 1/s)"

RATE_PER_MIN = 1200.0
#: The limiter's default safety margin (it sends at 98 % of the configured rate) and burst
#: (a second's worth goes out at once from a full bucket).
SAFETY_MARGIN = 0.02
BURST_S = 1.0
BATCH_THREADS = 16
INTERACTIVE_EVERY_S = 1.0
#: The sandbox's answer time: short against the send interval, long enough to be a network.
LATENCY_S = 0.02
BATCH_MODEL, INTERACTIVE_MODEL = "gpt-4o-mini", "gpt-4o"
#: How far past its ideal time the batch may finish (the issue's 1.1x).
BATCH_SLACK = 1.1

#: (key, case, client, lane of the batch, lane of the interactive calls, fleet: the batch and
#: the interactive calls in two processes sharing a redis_limiter)
CASES = (
    ("lanes", "batch in batch, interactive in interactive", "cometkit, in-process limiter",
     "batch", "interactive", False),
    ("one-lane", "every call in one lane (for comparison)", "cometkit, in-process limiter",
     "default", "default", False),
    ("fleet", "fleet: the batch in one process, interactive calls in another",
     "cometkit x 2 processes (redis_limiter)", "batch", "interactive", True),
)
#: The limiter section of every case: the configured rate, nothing learned.
LIMIT = {"requests_per_minute": RATE_PER_MIN, "adaptive": False}

def send_interval_s() -> float:
    return 60.0 / (RATE_PER_MIN * (1.0 - SAFETY_MARGIN))


def percentile(values: list, share: float) -> Optional[float]:
    """The nearest-rank percentile (``None`` for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def _child(spec: dict, timeout_s: float) -> tuple:
    """Run one workload process; its result and its :class:`ChildResult`."""
    argv = [sys.executable, "-m", "benchmarks.priority", json.dumps(spec)]
    child = run_child(argv, env=child_env(), timeout_s=timeout_s)
    if child.returncode != 0:
        raise BenchmarkError(f"priority workload exited with {child.returncode}:\n"
                             f"{tail(child.stderr)}")
    return json.loads(child.stdout.strip().splitlines()[-1]), child


def _run_case(base_url: str, batch_calls: int, batch_lane: str, interactive_lane: str,
              redis_url: Optional[str]) -> tuple:
    """The batch and the interactive calls, in one process or (``redis_url``) in two that
    share a ``redis_limiter``: the merged result and the CPU seconds of all processes."""
    timeout_s = 60.0 + batch_calls / 10.0
    spec = {"base_url": base_url, "batch_calls": batch_calls, "batch_lane": batch_lane,
            "interactive_lane": interactive_lane}
    if redis_url is None:
        result, child = _child({**spec, "plugins": {"limiter": LIMIT}}, timeout_s)
        return result, child.cpu_s, child.maxrss_kb
    plugins = {"limiter": False, "redis_limiter": {**LIMIT, "url": redis_url}}
    start_at = time.time() + 3.0  # both processes imported and connected by then
    # The interactive process sends while the batch runs (its ideal time, less a margin).
    interactive_for_s = (batch_calls - BURST_S / send_interval_s()) * send_interval_s() - 1.0
    outcomes: dict = {}

    def run_one(role: str, extra: dict) -> None:
        try:
            outcomes[role] = _child({**spec, **extra, "plugins": plugins, "role": role,
                                     "start_at": start_at}, timeout_s)
        except BaseException as exc:  # raised below, in the caller's thread
            outcomes[role] = exc

    threads = [threading.Thread(target=run_one, args=("batch", {})),
               threading.Thread(target=run_one, args=("interactive",
                                                      {"interactive_for_s": interactive_for_s}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 10.0)
    for outcome in outcomes.values():
        if isinstance(outcome, BaseException):
            raise outcome
    (batch, batch_child), (interactive, interactive_child) = (outcomes["batch"],
                                                              outcomes["interactive"])
    errors = dict(batch["errors"])
    for name, count in interactive["errors"].items():
        errors[name] = errors.get(name, 0) + count
    merged = {"ok": batch["ok"] + interactive["ok"],
              "failed": batch["failed"] + interactive["failed"], "errors": errors,
              "batch_wall_s": batch["batch_wall_s"],
              "interactive_queue_s": interactive["interactive_queue_s"]}
    return (merged, batch_child.cpu_s + interactive_child.cpu_s,
            max(batch_child.maxrss_kb, interactive_child.maxrss_kb))


def run(quick: bool, log: Callable[[str], Any]) -> Suite:
    batch_calls = 200 if quick else 600
    suite = Suite()
    for key, case, client, batch_lane, interactive_lane, fleet in CASES:
        if fleet and REDIS_SERVER is None:
            log(f"[{NAME}] {case}: skipped, redis-server is not installed")
            continue
        with contextlib.ExitStack() as stack:
            sandbox = stack.enter_context(SandboxProcess(latency_s=LATENCY_S))
            redis_url = stack.enter_context(RedisServer()).url if fleet else None
            result, cpu_s, maxrss_kb = _run_case(sandbox.base_url, batch_calls, batch_lane,
                                                 interactive_lane, redis_url)
        interactive = result["interactive_queue_s"]
        rate_per_s = 1.0 / send_interval_s()
        # The batch's ideal: its calls beyond the first burst at the rate the interactive
        # calls leave it.
        share_per_s = len(interactive) / result["batch_wall_s"]
        ideal_s = (batch_calls - BURST_S * rate_per_s) / (rate_per_s - share_per_s)
        row = Row(bench=NAME, key=key, client=client, calls=batch_calls + len(interactive),
                  threads=BATCH_THREADS, ok=result["ok"], failed=result["failed"],
                  wall_s=result["batch_wall_s"], errors=result["errors"], cpu_s=cpu_s,
                  rss_mb=maxrss_kb / 1024, ideal_wall_s=ideal_s, priority_case=case,
                  info={"interactive_calls": len(interactive),
                        "queue_p50_s": percentile(interactive, 0.5),
                        "queue_p95_s": percentile(interactive, 0.95),
                        "queue_max_s": max(interactive) if interactive else None,
                        "send_interval_s": send_interval_s()})
        log(f"[{NAME}] {case}: batch of {batch_calls} in {row.wall_s:.2f} s, "
            f"{len(interactive)} interactive calls, queue p95 "
            f"{row.info['queue_p95_s'] or 0:.3f} s")
        suite.rows.append(row)
    _checks(suite)
    return suite


def _checks(suite: Suite) -> None:
    for row in suite.rows:
        if row.key == "one-lane":
            continue
        p95, interval = row.info["queue_p95_s"], row.info["send_interval_s"]
        prefix = "" if row.key == "lanes" else f"{row.priority_case}: "
        # The issue's bound is the in-process limiter's; across a fleet it is measured and
        # shown (the Redis store's waiters poll, so a fleet's waits are not bounded as tightly).
        met = p95 is not None and p95 <= interval
        suite.check(f"{prefix}interactive calls' admission wait (queue_s) p95 <= one send "
                    f"interval ({interval * 1000:.0f} ms)",
                    "no interactive call" if p95 is None else f"p95 {p95 * 1000:.1f} ms, p50 "
                    f"{row.info['queue_p50_s'] * 1000:.1f} ms over "
                    f"{row.info['interactive_calls']} calls",
                    met if row.key == "lanes" else (True if met else None))
        suite.check(f"{prefix}the batch finishes within {BATCH_SLACK:g}x its ideal time less "
                    "the interactive share",
                    f"{row.wall_s:.2f} s against {row.ideal_wall_s:.2f} s "
                    f"({row.vs_ideal:.3f}x)",
                    row.vs_ideal is not None and row.vs_ideal <= BATCH_SLACK)
        suite.check(f"{prefix}every call answered", f"{row.ok}/{row.calls}", row.failed == 0)


# -- the measured workload (the child process) ---------------------------------------------


class _QueueTimes:
    """A metrics sink plugin keeping the interactive model's admission waits."""

    __name__ = "benchmark_queue_times"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue_s: list = []

    @cometkit.hookimpl
    def cometkit_make_metrics_sink(self, ctx: Any) -> Any:
        return self

    def record_attempt(self, record: Any) -> None:
        if record.model == INTERACTIVE_MODEL:
            with self.lock:
                self.queue_s.append(record.queue_s)

    def record_call(self, record: Any) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


def workload(spec: dict) -> dict:
    """One process's part (``role``): ``both`` (the batch on 16 threads, an interactive call
    every second meanwhile), ``batch`` or ``interactive`` (for ``interactive_for_s``)."""
    role = spec.get("role", "both")
    sink = _QueueTimes()
    messages = [{"role": "user", "content": "hi"}]
    client = cometkit.Client(
        "sk-benchmark", spec["base_url"], concurrency=BATCH_THREADS + 1, extra_plugins=[sink],
        plugins={"backoff": {"retry_on": []}, **spec["plugins"]})
    errors: dict = {}
    counts = [0, 0]
    lock = threading.Lock()

    def call(model: str, lane: str) -> None:
        try:
            client.chat.completions.create(model=model, messages=messages, priority=lane)
            outcome = 0
        except cometkit.CometError as exc:
            outcome = 1
            with lock:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        with lock:
            counts[outcome] += 1

    batch_calls = spec["batch_calls"] if role != "interactive" else 0
    with client, ThreadPoolExecutor(BATCH_THREADS) as pool:
        # warm-up: imports, the first connection (and Redis' scripts) before the clock starts
        client.chat.completions.create(model=BATCH_MODEL, messages=messages)
        pause = spec.get("start_at", 0.0) - time.time()
        if pause > 0:
            time.sleep(pause)
        started = time.perf_counter()
        futures = [pool.submit(call, BATCH_MODEL, spec["batch_lane"])
                   for _ in range(batch_calls)]
        cap = started + 10.0 + spec["batch_calls"] / 5.0
        until = started + spec.get("interactive_for_s", 0.0)
        next_at = started + INTERACTIVE_EVERY_S

        def busy() -> bool:
            now = time.perf_counter()
            if now >= cap:
                return False
            if role == "interactive":
                return now < until
            return not all(f.done() for f in futures)

        while busy():
            wait_s = next_at - time.perf_counter()
            if role == "batch" or wait_s > 0:
                time.sleep(0.05 if role == "batch" else min(wait_s, 0.05))
                continue
            call(INTERACTIVE_MODEL, spec["interactive_lane"])
            next_at += INTERACTIVE_EVERY_S
        for future in futures:
            future.result(timeout=max(0.0, cap - time.perf_counter()) + 5.0)
        batch_wall_s = time.perf_counter() - started
    return {"ok": counts[0], "failed": counts[1], "errors": errors,
            "batch_wall_s": batch_wall_s, "interactive_queue_s": sink.queue_s}


if __name__ == "__main__":
    print(json.dumps(workload(json.loads(sys.argv[1]))))
