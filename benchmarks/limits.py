"""The share of the limit achieved: each client against the limit shapes real servers enforce.

One row per limit shape and client. A shape is a server-side limit as deployments meet it: a
token bucket (OpenAI-style), a fixed window opened by the first request (LiteLLM's proxy, whose
429 says ``Retry-After: <window length>``), a calendar minute without any hint (LiteLLM's
router), a leaky bucket (nginx ``limit_req`` in front of the sandbox: Debian's own nginx), a
token-per-minute bucket counted by the server's tokenizer, a concurrency cap worded as
LiteLLM's ``max_parallel_requests``, and fleets of processes sharing a ``redis_limiter`` (against a
bucket, a window and a cap: the server counts the whole fleet's calls).

The clients: cometkit with its defaults (the limit unknown to it), cometkit told the limit
(the ``limiter`` options that describe it), the ``openai`` SDK with its own retries, and the
CometAPI guide's recipes. Each run gets a fresh server (full buckets, no window open) and a
time cap; a run killed at its cap is reported as such.

"Ideal" is the least wall time the limit allows for that many calls: what a client that knew
the limit exactly, and sent each call the moment the server would take it, would need.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from cometkit.sandbox import SandboxProcess

from .contenders import CONTENDERS, MODEL, Spec, prompt
from .runner import (
    REPO_ROOT,
    BenchmarkError,
    BenchmarkTimeout,
    Check,
    Row,
    Suite,
    measure,
    run_worker,
)

# nginx and Redis run the way the test suite runs them: one helper each, in tests/.
_TESTS = str(REPO_ROOT / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from nginx_server import NGINX, NginxLimiter  # noqa: E402
from redis_server import REDIS_SERVER, RedisServer  # noqa: E402

NAME = "limits"
TITLE = "Share of the limit achieved (one row per limit shape and client)"

THREADS = 16
#: How long the sandbox takes to answer an admitted call, unless a shape says otherwise.
LATENCY_S = 0.05
#: The targets (from the issue that asked for this suite).
DEFAULTS_MAX_VS_IDEAL = 1.15
TOLD_MAX_VS_IDEAL = 1.05
DEFAULTS_MAX_429_SHARE = 0.10
#: Clock-aligned windows: each run starts this far into a window (a fixed point, so that runs
#: compare), at least START_LEAD_S from now (the worker must import and build its client).
CLOCK_PHASE_S = 1.0
START_LEAD_S = 5.0
#: Prompt lengths of the token-limit shape: drawn once, the same for every client.
PROMPT_SEED = 20261201
PROMPT_CHARS = (100, 3000)


# -- what a perfect client needs -----------------------------------------------------------


def bucket_ideal_s(costs: Iterable[float], rate_per_s: float, capacity: float,
                   latency_s: float = 0.0) -> float:
    """The least wall time for calls costing ``costs`` against a token bucket that starts full
    with ``capacity`` and refills ``rate_per_s``: each call is sent the moment the bucket can
    take it (a cost above the capacity goes when the bucket is full and leaves a debt, as the
    sandbox does), the last answer comes ``latency_s`` later. A leaky bucket like nginx's
    ``limit_req`` is the same with ``capacity = burst + 1``."""
    level, now = float(capacity), 0.0
    for cost in costs:
        need = min(cost, capacity)
        if level < need:
            now += (need - level) / rate_per_s
            level = need
        level -= cost
    return now + latency_s


def window_ideal_s(calls: int, per_window: int, window_s: float, latency_s: float = 0.0,
                   phase_s: float = 0.0) -> float:
    """The least wall time for ``calls`` against ``per_window`` calls per fixed window: the
    first window's worth at once, then a window's worth as each window opens. ``phase_s`` is
    how far into its window the run started (0 for a window opened by the first request)."""
    windows = math.ceil(calls / per_window)
    if windows <= 1:
        return latency_s
    return (windows - 1) * window_s - phase_s + latency_s


def in_flight_ideal_s(calls: int, max_in_flight: int, latency_s: float) -> float:
    """The least wall time for ``calls`` when at most ``max_in_flight`` are served at once."""
    return math.ceil(calls / max_in_flight) * latency_s


def prompt_chars(calls: int, seed: int = PROMPT_SEED) -> list:
    """Prompt lengths for the token shape: uniform in PROMPT_CHARS, the same every run."""
    draw = random.Random(seed)
    return [draw.randint(*PROMPT_CHARS) for _ in range(calls)]


def chat_charges(chars: Sequence[int], token_ratio: float) -> list:
    """The tokens the sandbox charges for each call of the token shape, by its own count."""
    from cometkit.sandbox import responses

    return [responses.plan_chat(
        {"model": MODEL, "messages": [{"role": "user", "content": prompt(i, n)}]},
        token_ratio).charge for i, n in enumerate(chars)]


# -- the shapes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One limit shape: the server, what telling cometkit the limit means, and the ideal."""

    key: str
    label: str
    calls: int
    #: Calls in a ``--quick`` run; ``None``: full runs only.
    quick_calls: Optional[int]
    #: ``SandboxProcess`` keyword arguments.
    sandbox: dict
    #: ``(calls, phase_s) -> seconds``: the least wall time the limit allows.
    ideal: Callable[[int, float], float]
    #: cometkit's ``limiter`` section when it is told the limit; ``None``: no such row.
    told: Optional[dict] = None
    #: ``NginxLimiter`` keyword arguments: nginx stands in front of the sandbox.
    nginx: Optional[dict] = None
    #: Processes sharing one ``redis_limiter`` (cometkit with defaults only); 0: one client.
    fleet: int = 0
    #: Windows aligned to the wall clock of this length: runs start at CLOCK_PHASE_S into one.
    clock_window_s: Optional[float] = None
    #: Prompt lengths (characters) per item; empty for the short prompt.
    prompt_chars: tuple = ()

    def calls_for(self, quick: bool) -> Optional[int]:
        return self.quick_calls if quick else self.calls


def _bucket_shape(rate_per_s: float, capacity: float, latency_s: float) -> Callable:
    return lambda calls, _phase: bucket_ideal_s([1] * calls, rate_per_s, capacity, latency_s)


def _window_shape(per_window: int, window_s: float, latency_s: float) -> Callable:
    return lambda calls, phase: window_ideal_s(calls, per_window, window_s, latency_s, phase)


def _tokens_shape(tpm: float, token_ratio: float, chars: Sequence[int],
                  latency_s: float) -> Callable:
    rate_per_s = tpm / 60.0
    capacity = max(1.0, rate_per_s)  # the sandbox's token bucket holds one second's worth

    def ideal(calls: int, _phase: float) -> float:
        return bucket_ideal_s(chat_charges(list(chars)[:calls], token_ratio), rate_per_s,
                              capacity, latency_s)
    return ideal


_TOKEN_CHARS = tuple(prompt_chars(60))

SHAPES = (
    Shape("rps", "token bucket: 20 calls/s, burst 20 (Retry-After)", 200, 100,
          dict(rps=20, latency_s=LATENCY_S, retry_after="seconds"),
          _bucket_shape(20, 20, LATENCY_S), told={"requests_per_minute": 1200}),
    Shape("window-10-10s",
          "fixed window: 10 per 10 s from the first call, Retry-After: 10 (LiteLLM proxy)",
          40, 20,
          dict(window_requests=10, window_s=10.0, window_align="first_request",
               window_retry_after="window", latency_s=LATENCY_S),
          _window_shape(10, 10.0, LATENCY_S), told={"requests_per_minute": 60, "window": 10}),
    Shape("window-30-60s",
          "fixed window: 30 per 60 s from the first call, Retry-After: 60 (LiteLLM proxy)",
          90, None,
          dict(window_requests=30, window_s=60.0, window_align="first_request",
               window_retry_after="window", latency_s=LATENCY_S),
          _window_shape(30, 60.0, LATENCY_S), told={"requests_per_minute": 30, "window": 60}),
    Shape("calendar-minute",
          "calendar minute: 20 per clock minute, no Retry-After (LiteLLM router)", 40, None,
          dict(window_requests=20, window_s=60.0, window_align="clock",
               window_retry_after="none", latency_s=LATENCY_S),
          _window_shape(20, 60.0, LATENCY_S), told={"requests_per_minute": 20, "window": 60,
                                                   "window_align": "clock"},
          clock_window_s=60.0),
    Shape("nginx", "leaky bucket: nginx limit_req 20 r/s, burst 5 (no Retry-After)", 200, 100,
          dict(latency_s=LATENCY_S), _bucket_shape(20, 5 + 1, LATENCY_S),
          told={"requests_per_minute": 1200, "burst": 0.25},
          nginx=dict(rate="20r/s", burst=5, nodelay=True)),
    Shape("tpm", "tokens per minute: 40k, server counts 1.3x, prompts 100-3000 chars", 60, 15,
          dict(tpm=40_000, token_ratio=1.3, latency_s=LATENCY_S),
          _tokens_shape(40_000, 1.3, _TOKEN_CHARS, LATENCY_S),
          told={"tokens_per_minute": 40_000}, prompt_chars=_TOKEN_CHARS),
    Shape("in-flight", "concurrency cap: 4 in flight, 0.2 s answers (LiteLLM wording, "
                       "Retry-After: 10)", 100, 50,
          dict(max_in_flight=4, in_flight_style="litellm", in_flight_retry_after_s=10.0,
               latency_s=0.2),
          lambda calls, _phase: in_flight_ideal_s(calls, 4, 0.2), told={"max_concurrency": 4}),
    Shape("fleet-2", "fleet: 2 processes, redis_limiter, 20 calls/s, 10 ms answers", 200, 100,
          dict(rps=20, latency_s=0.01), _bucket_shape(20, 20, 0.01), fleet=2),
    Shape("fleet-4", "fleet: 4 processes, redis_limiter, 20 calls/s, 10 ms answers", 200, None,
          dict(rps=20, latency_s=0.01), _bucket_shape(20, 20, 0.01), fleet=4),
    Shape("fleet-4-window", "fleet: 4 processes, redis_limiter, fixed window 10 per 10 s "
                            "(LiteLLM proxy)", 40, None,
          dict(window_requests=10, window_s=10.0, window_align="first_request",
               window_retry_after="window", latency_s=LATENCY_S),
          _window_shape(10, 10.0, LATENCY_S), fleet=4),
    Shape("fleet-2-in-flight", "fleet: 2 processes, redis_limiter, concurrency cap 4 "
                               "(LiteLLM wording)", 100, None,
          dict(max_in_flight=4, in_flight_style="litellm", in_flight_retry_after_s=10.0,
               latency_s=0.2),
          lambda calls, _phase: in_flight_ideal_s(calls, 4, 0.2), fleet=2),
)


@dataclass(frozen=True)
class Client:
    key: str
    contender: str
    label: Optional[str] = None
    #: Tells cometkit the shape's limit (``Shape.told``).
    told: bool = False


#: Every shape but the fleets: these clients, in this order.
CLIENTS = (
    Client("cometkit-defaults", "cometkit", "cometkit (defaults)"),
    Client("cometkit-told", "cometkit", "cometkit (told the limit)", told=True),
    Client("openai", "openai"),
    Client("guide-429-loop", "guide-429-loop"),
    Client("guide-semaphore", "guide-semaphore"),
    Client("guide-both", "guide-both"),
)


def time_cap_s(ideal_s: float) -> float:
    """How long one run may take before it is killed and reported as over its cap."""
    return 3 * ideal_s + 60.0


def next_start_at(now: float, window_s: float, phase_s: float = CLOCK_PHASE_S,
                  lead_s: float = START_LEAD_S) -> float:
    """The first wall-clock instant at least ``lead_s`` after ``now`` that is ``phase_s`` into
    a clock-aligned window of ``window_s``."""
    earliest = now + lead_s
    start = math.floor(earliest / window_s) * window_s + phase_s
    return start if start >= earliest else start + window_s


# -- running ----------------------------------------------------------------------------------


@dataclass
class _Run:
    """One shape x client, ready to measure."""

    shape: Shape
    client: Client
    calls: int
    plugins: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.shape.key}:{self.client.key}"

    @property
    def label(self) -> str:
        if self.client.told:
            told = ", ".join(f"{k}: {v}" for k, v in (self.shape.told or {}).items())
            return f"cometkit (told: {told})"
        return self.client.label or CONTENDERS[self.client.contender][1]


def runs(quick: bool) -> Iterator[_Run]:
    """What a run measures, in order: every shape (but the full-only ones with ``quick``)
    with every client it has."""
    for shape in SHAPES:
        calls = shape.calls_for(quick)
        if calls is None:
            continue
        if shape.fleet:
            yield _Run(shape, Client("cometkit-defaults", "cometkit",
                                     f"cometkit x {shape.fleet} processes (redis_limiter)"),
                       calls)
            continue
        for client in CLIENTS:
            if client.told and shape.told is None:
                continue
            plugins = {"limiter": dict(shape.told or {})} if client.told else {}
            yield _Run(shape, client, calls, plugins)


def _timed_out_row(run: _Run, cap_s: float, ideal_s: float) -> Row:
    return Row(bench=NAME, key=run.key, client=run.label, calls=run.calls, threads=THREADS,
               ok=0, failed=run.calls, wall_s=cap_s, ideal_wall_s=ideal_s,
               shape=run.shape.label, timed_out_s=cap_s)


def _measure_one(run: _Run, log: Callable[[str], Any]) -> Row:
    shape = run.shape
    ideal_s = shape.ideal(run.calls, CLOCK_PHASE_S if shape.clock_window_s else 0.0)
    cap_s = time_cap_s(ideal_s) + (shape.clock_window_s or 0.0) + START_LEAD_S
    with contextlib.ExitStack() as stack:
        sandbox = stack.enter_context(SandboxProcess(**shape.sandbox))
        nginx = (stack.enter_context(NginxLimiter(sandbox.base_url, **shape.nginx))
                 if shape.nginx is not None else None)
        start_at = (next_start_at(time.time(), shape.clock_window_s)
                    if shape.clock_window_s else 0.0)
        spec = Spec(run.client.contender, nginx.base_url if nginx else sandbox.base_url,
                    run.calls, THREADS, plugins=run.plugins,
                    prompt_chars=list(shape.prompt_chars), start_at=start_at)
        try:
            row = measure(sandbox, NAME, run.key, spec, label=run.label, ideal_wall_s=ideal_s,
                          timeout_s=cap_s, log=log)
        except BenchmarkTimeout:
            log(f"[{NAME}] {run.label}: over its time cap of {cap_s:.0f} s")
            return _timed_out_row(run, cap_s, ideal_s)
        if shape.clock_window_s:
            phase_s = row.info["started_at"] % shape.clock_window_s
            row.ideal_wall_s = shape.ideal(run.calls, phase_s)
        if nginx is not None:
            # The sandbox saw only what nginx let through: attempts and 429s are nginx's.
            statuses = nginx.statuses(at_least=row.attempts or 0)
            row.attempts, row.rate_limited = sum(statuses.values()), statuses.get(429, 0)
            row.connections = None
    row.shape = shape.label
    return row


def _measure_fleet(run: _Run, log: Callable[[str], Any]) -> Row:
    """``shape.fleet`` worker processes started together, sharing one Redis."""
    shape = run.shape
    ideal_s = shape.ideal(run.calls, 0.0)
    cap_s = time_cap_s(ideal_s) + START_LEAD_S
    share = [run.calls // shape.fleet + (1 if i < run.calls % shape.fleet else 0)
             for i in range(shape.fleet)]
    with RedisServer() as redis, SandboxProcess(**shape.sandbox) as sandbox:
        plugins = {"redis_limiter": {"url": redis.url}}
        start_at = time.time() + START_LEAD_S
        specs = [Spec("cometkit", sandbox.base_url, calls, THREADS, plugins=plugins,
                      start_at=start_at) for calls in share]
        results: list = [None] * len(specs)

        def work(i: int) -> None:
            try:
                results[i] = run_worker(specs[i], timeout_s=cap_s)
            except BenchmarkError as exc:
                results[i] = exc

        sandbox.reset_stats()
        threads = [threading.Thread(target=work, args=(i,), daemon=True)
                   for i in range(len(specs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(cap_s + 30)
        stats = sandbox.stats()
    if any(isinstance(r, BenchmarkTimeout) or r is None for r in results):
        log(f"[{NAME}] {run.label}: over its time cap of {cap_s:.0f} s")
        return _timed_out_row(run, cap_s, ideal_s)
    for result in results:
        if isinstance(result, BenchmarkError):
            raise result
    errors: dict = {}
    for result in results:
        for name, count in result["errors"].items():
            errors[name] = errors.get(name, 0) + count
    first = min(r["started_at"] for r in results)
    row = Row(bench=NAME, key=run.key, client=run.label, calls=run.calls,
              threads=THREADS * shape.fleet, ok=sum(r["ok"] for r in results),
              failed=sum(r["failed"] for r in results), errors=errors,
              wall_s=max(r["started_at"] + r["wall_s"] for r in results) - first,
              cpu_s=sum(r["cpu_s"] for r in results), ideal_wall_s=ideal_s,
              attempts=stats["attempts"], rate_limited=stats["attempts_by_status"].get(429, 0),
              connections=stats["connections_accepted"] - 1, shape=shape.label)
    failures = f", failed {row.failed}" if row.failed else ""
    log(f"[{NAME}] {row.client}: {row.calls} calls in {row.wall_s:.2f} s{failures}")
    return row


def _missing(shape: Shape) -> Optional[str]:
    """Why a shape cannot run on this machine, if it cannot."""
    if shape.nginx is not None and NGINX is None:
        return "nginx is not installed (apt-get install nginx)"
    if shape.fleet and REDIS_SERVER is None:
        return "redis-server is not installed (apt-get install redis-server)"
    return None


def run(quick: bool, log: Callable[[str], Any]) -> Suite:
    suite = Suite()
    skipped: dict = {}
    for one in runs(quick):
        why = _missing(one.shape)
        if why is not None:
            skipped[one.shape.label] = why
            continue
        measure_run = _measure_fleet if one.shape.fleet else _measure_one
        suite.rows.append(measure_run(one, log))
    for label, why in skipped.items():
        log(f"[{NAME}] skipped {label}: {why}")
    check(suite)
    for label, why in skipped.items():
        suite.checks.append(Check(NAME, f"{label}: runs", f"skipped: {why}", False))
    return suite


# -- targets ----------------------------------------------------------------------------------


def _vs_ideal(row: Row) -> str:
    if row.timed_out_s is not None:
        return f"over its time cap of {row.timed_out_s:.0f} s"
    return f"{row.wall_s:.2f} s = {row.vs_ideal:.2f}x of {row.ideal_wall_s:.2f} s"


def check(suite: Suite) -> None:
    """The goals, for every shape: every call ok for cometkit; defaults within 1.15x of ideal
    and under 10 % 429s; told the limit within 1.05x."""
    for row in suite.rows:
        if row.bench != NAME or not row.client.startswith("cometkit"):
            continue
        told = row.key.endswith(":cometkit-told")
        where = f"{row.shape} / {row.client}"
        timed_out = row.timed_out_s is not None
        suite.check(f"{where}: every call ok",
                    _vs_ideal(row) if timed_out else f"{row.ok}/{row.calls} ok",
                    not timed_out and row.ok == row.calls)
        limit = TOLD_MAX_VS_IDEAL if told else DEFAULTS_MAX_VS_IDEAL
        suite.check(f"{where}: wall <= {limit:.2f}x ideal", _vs_ideal(row),
                    not timed_out and row.vs_ideal is not None and row.vs_ideal <= limit)
        if not told:
            share = (row.rate_limited or 0) / row.calls
            suite.check(f"{where}: 429s < {DEFAULTS_MAX_429_SHARE:.0%} of calls",
                        "unknown" if timed_out else f"{row.rate_limited} = {share:.1%}",
                        not timed_out and share < DEFAULTS_MAX_429_SHARE)
