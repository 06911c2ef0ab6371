"""The ``redis_limiter`` against a real ``redis-server``: fleets of worker processes sharing one
limit through it, a killed process's slots coming back, a 429 pausing the others, and what
happens when Redis is not there. Counts come from the sandbox, which saw every attempt, and
from Redis itself."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from fakes import FakeClock
from redis_server import REDIS_SERVER, RedisServer, free_port
from requests.structures import CaseInsensitiveDict
from scripted_server import wait_until

import cometkit
from cometkit import AttemptResult, RateLimitError, RequestInfo
from cometkit.hints import parse_hints
from cometkit.sandbox import Sandbox, SandboxProcess
from cometkit_plugins.limiting._redis_admission import POLL_MAX_S
from cometkit_plugins.limiting.adaptive import CONCURRENCY_BACKOFF, INITIAL_LIMIT
from cometkit_plugins.redis_limiter import DEFAULT_URL, RedisLimiter

redis = pytest.importorskip("redis", reason="redis-py is not installed: pip install "
                                            "'cometkit[redis]'")

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(60),
    pytest.mark.skipif(REDIS_SERVER is None,
                       reason="redis-server is not on PATH (.ci/run installs Debian's "
                              "redis-server; apt-get install redis-server)"),
]

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "redis_worker.py"
KEY = "sk-test-redis-limiter-7f3a9c"
MESSAGES = [{"role": "user", "content": "hi"}]
REQUEST = RequestInfo("ck-test", "chat", "POST", "/chat/completions", model="m1")


def fingerprint(key: str = KEY) -> str:
    with cometkit.Client(key, "http://127.0.0.1:9/v1", config={"plugins": {}}) as client:
        return client.context.api_key_fingerprint


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def rdb(redis_url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def live_leases(rdb: Any, key: str) -> int:
    """Members of a lease set that have not expired, in Redis' time."""
    seconds, micros = rdb.time()
    return rdb.zcount(key, seconds * 1000 + micros / 1000, "+inf")


def result(status: int, **kwargs: Any) -> AttemptResult:
    return AttemptResult(REQUEST, 1, status_code=status, **kwargs)


# -- worker processes ----------------------------------------------------------------------


def spawn(spec: dict, **popen: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], text=True,
                            **popen)


def report_of(process: subprocess.Popen, timeout_s: float = 45.0) -> dict:
    out, err = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def run_fleet(spec: dict, processes: int) -> list[dict]:
    """Start ``processes`` workers, wait until every one is ready, start them together."""
    fleet = [spawn({**spec, "wait_for_go": True}, stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(processes)]
    try:
        for process in fleet:
            line = process.stdout.readline()
            assert line.strip() == "ready", process.stderr.read()
        for process in fleet:
            process.stdin.write("go\n")
            process.stdin.flush()
        return [report_of(process) for process in fleet]
    finally:
        for process in fleet:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def run_worker(spec: dict) -> dict:
    return report_of(spawn(spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE))


# -- a fleet sharing one limit ---------------------------------------------------------------


@pytest.mark.slow
def test_four_processes_never_exceed_the_fleets_max_concurrency_and_use_all_of_it(redis_url):
    latency_s, slots, calls = 0.1, 6, 30
    with SandboxProcess(latency_s=latency_s) as sandbox:
        reports = run_fleet({"key": KEY, "base_url": sandbox.base_url, "threads": 8,
                             "calls": calls,
                             "plugins": {"redis_limiter": {"url": redis_url,
                                                           "max_concurrency": slots}}}, 4)
        stats = sandbox.stats()
    assert [r["errors"] for r in reports] == [[]] * 4
    assert stats["attempts"] == 4 * calls
    # 32 threads, but never more than 6 requests in flight across the 4 processes ...
    assert stats["max_in_flight_seen"] <= slots
    # ... and the 6 slots are used: at least half of what 6 slots allow (6 / latency per s).
    span_s = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    assert 4 * calls / span_s >= 0.5 * slots / latency_s, span_s


@pytest.mark.slow
def test_the_slots_of_a_killed_process_come_back_within_lease_ttl(redis_url, rdb):
    lease_ttl, slots = 2.0, 6
    options = {"url": redis_url, "max_concurrency": slots, "lease_ttl": lease_ttl,
               "adaptive": False}
    slots_key = f"cometkit:{fingerprint()}:all:slots"
    with SandboxProcess(latency_s=30) as slow, Sandbox(latency_s=0.1) as fast:
        holder = spawn({"key": KEY, "base_url": slow.base_url, "threads": slots, "calls": slots,
                        "plugins": {"redis_limiter": options, "backoff": False}},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: live_leases(rdb, slots_key) == slots, 20)
            # A running attempt keeps its slot past lease_ttl: the holder renews its leases.
            time.sleep(1.5 * lease_ttl)
            assert live_leases(rdb, slots_key) == slots
            other = RedisLimiter(url=redis_url, namespace=fingerprint(), **{
                k: v for k, v in options.items() if k != "url"})
            with pytest.raises(RateLimitError, match="shared concurrency slot"):
                other.acquire(REQUEST, 0.3)
            other.close()

            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            killed_at = time.monotonic()
            with cometkit.Client(KEY, fast.base_url, concurrency=slots,
                                 config={"plugins": {"redis_limiter": options}}) as client:
                results = list(client.map(
                    lambda _: client.chat.completions.create(model="m1", messages=MESSAGES),
                    range(4 * slots), return_exceptions=True))
            regained_after_s = time.monotonic() - killed_at
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)
        stats = fast.stats()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert stats["max_in_flight_seen"] == slots  # every slot of the dead process came back
    # Waiting out the leases (at most lease_ttl) plus 4 rounds of 0.1 s calls, with slack.
    assert regained_after_s < lease_ttl + 3.0


@pytest.mark.slow
def test_a_shared_requests_per_minute_keeps_the_fleets_429s_near_zero(redis_url):
    """The sandbox allows 40 requests/s per model; 32 threads could send 1600/s."""
    rpm, calls = 2400, 40
    with SandboxProcess(rpm=rpm, latency_s=0.02) as sandbox:
        reports = run_fleet({"key": KEY, "base_url": sandbox.base_url, "threads": 8,
                             "calls": calls,
                             "plugins": {"redis_limiter": {"url": redis_url,
                                                           "requests_per_minute": rpm}}}, 4)
        stats = sandbox.stats()
    assert [r["errors"] for r in reports] == [[]] * 4
    assert stats["attempts_by_status"].get(200) == 4 * calls
    assert stats["attempts_by_status"].get(429, 0) <= 0.02 * 4 * calls, stats


@pytest.mark.slow
def test_a_fleet_told_nothing_loses_no_call_and_learns_not_to_flood_a_fast_server(redis_url):
    """Two processes, adaptive, no rates told, against 20 calls/s with 10 ms answers: the
    fleet learns one rate (the in-process limiter's policy, fed the whole fleet's answers),
    and a 429 waits out the shared hold instead of failing the call."""
    calls = 100
    with SandboxProcess(rps=20, latency_s=0.01) as sandbox:
        reports = run_fleet({"key": KEY, "base_url": sandbox.base_url, "threads": 16,
                             "calls": calls,
                             "plugins": {"redis_limiter": {"url": redis_url},
                                         "backoff": {"max_attempts": 2}}}, 2)
        stats = sandbox.stats()
    assert [r["errors"] for r in reports] == [[]] * 2
    assert stats["attempts_by_status"].get(200) == 2 * calls
    assert stats["attempts_by_status"].get(429, 0) <= 0.25 * 2 * calls, stats


@pytest.mark.slow
def test_four_processes_told_nothing_share_one_learned_rate_and_lose_no_call(redis_url, rdb):
    """Four processes, defaults, against 20 calls/s with 10 ms answers (the benchmark's
    fleet-4 shape). The server's bucket holds 20 calls; what the fleet sends before the
    first refusals come back is bounded by its shared concurrency (4 at first, doubling per
    round trip of 10 ms), and after that by the one learned rate every process sends at, so
    the 429s are a wave or two, not one per process per signal: at most 10 % of the calls
    (the issue's goal; the benchmark sees 2 to 4 %)."""
    calls = 50
    with SandboxProcess(rps=20, latency_s=0.01) as sandbox:
        reports = run_fleet({"key": KEY, "base_url": sandbox.base_url, "threads": 16,
                             "calls": calls, "plugins": {"redis_limiter": {"url": redis_url}}},
                            4)
        stats = sandbox.stats()
    assert [r["errors"] for r in reports] == [[]] * 4
    assert stats["attempts_by_status"].get(200) == 4 * calls
    assert stats["attempts_by_status"].get(429, 0) <= 0.1 * 4 * calls, stats
    # One rate for the fleet, near the server's 20/s -- not four shares, nor four times it.
    learned = json.loads(rdb.hget(f"cometkit:{fingerprint()}:model:m1:learned", "rate_per_s"))
    assert 10 <= learned <= 40, learned


@pytest.mark.slow
def test_a_fleet_told_nothing_learns_a_token_limit_without_losing_a_call(redis_url, rdb):
    """Two processes against 60k tokens per minute counted by the server's own tokenizer
    (1.3x the client's estimate): the fleet learns one token rate from token 429s, and every
    process spends it."""
    calls = 16
    with SandboxProcess(tpm=60_000, token_ratio=1.3, latency_s=0.02) as sandbox:
        reports = run_fleet({"key": KEY, "base_url": sandbox.base_url, "threads": 8,
                             "calls": calls, "prompt_chars": 1600,
                             "plugins": {"redis_limiter": {"url": redis_url},
                                         "backoff": {"max_attempts": 2}}}, 2)
        stats = sandbox.stats()
    assert [r["errors"] for r in reports] == [[]] * 2
    assert stats["attempts_by_status"].get(200) == 2 * calls
    assert stats["rate_limited"].get("tokens", 0) == stats["attempts_by_status"].get(429, 0)
    if stats["rate_limited"].get("tokens"):  # a token 429 taught the fleet its token rate
        learned = rdb.hget(f"cometkit:{fingerprint()}:model:m1:learned", "token_rate_per_s")
        assert learned is not None and json.loads(learned) > 0


@pytest.mark.slow
def test_a_429_in_one_process_holds_admissions_in_the_others(redis_url, rdb):
    hold_s = 5
    hold_key = f"cometkit:{fingerprint()}:model:m1:hold"
    control_key = f"cometkit:{fingerprint()}:model:m1:control"
    options = {"url": redis_url}
    with Sandbox(always_429=True, retry_after_value_s=hold_s) as refusing, Sandbox() as fine:
        with cometkit.Client(KEY, refusing.base_url, config={
                "plugins": {"redis_limiter": options, "backoff": False}}) as client:
            assert "redis_limiter" in client.plugins
            with pytest.raises(RateLimitError):
                client.chat.completions.create(model="m1", messages=MESSAGES)
        assert rdb.pttl(hold_key) > 1000 * (hold_s - 1)
        assert float(rdb.hget(control_key, "limit")) == pytest.approx(
            INITIAL_LIMIT * CONCURRENCY_BACKOFF)

        # Another process, another server, the same key and model: held back.
        held = run_worker({"key": KEY, "base_url": fine.base_url, "threads": 1, "calls": 1,
                           "plugins": {"redis_limiter": {**options, "acquire_timeout": 0.5},
                                       "backoff": False}})
        assert rdb.pttl(hold_key) > 0, "the hold ended before the worker asked: inconclusive"
        assert held["ok"] == 0
        assert "shared hold" in held["errors"][0], held
        assert fine.stats()["attempts"] == 0

        # Once the hold is over it goes out.
        later = run_worker({"key": KEY, "base_url": fine.base_url, "threads": 1, "calls": 1,
                            "plugins": {"redis_limiter": options}})
        assert later["ok"] == 1, later
        assert fine.stats()["attempts"] == 1


def test_a_call_held_by_the_shared_hold_ends_at_its_deadline(redis_url):
    """The deadline's time left is the Redis limiter's acquire timeout: a call that finds the
    model held (a 429 with a Retry-After longer than its deadline) ends at its deadline, never
    sent, within the bound of D + 0.25 s; a direct acquire takes the shorter of the two."""
    deadline_s = 1.0
    options = {"url": redis_url, "acquire_timeout": 30}
    with Sandbox(always_429=True, retry_after_value_s=30) as refusing:
        with cometkit.Client(KEY, refusing.base_url, deadline=deadline_s, config={
                "plugins": {"redis_limiter": options}}) as client:
            with pytest.raises(cometkit.APITimeoutError, match="would pass it"):
                client.chat.completions.create(model="m1", messages=MESSAGES)
            started = time.monotonic()
            with pytest.raises(cometkit.APITimeoutError) as info:
                client.chat.completions.create(model="m1", messages=MESSAGES)
            took = time.monotonic() - started
        assert refusing.stats()["attempts"] == 1
    assert took <= deadline_s + 0.25, took
    assert "waiting for admission, 0 attempts" in str(info.value)
    assert isinstance(info.value.__cause__, RateLimitError)  # the limiter's refusal, chained

    # Another process (a limiter of its own, nothing learned locally): Redis' shared hold.
    limiter = RedisLimiter(url=redis_url, namespace=fingerprint(), max_concurrency=4,
                           acquire_timeout=30)
    try:
        started = time.monotonic()
        with pytest.raises(RateLimitError, match="shared hold"):
            limiter.acquire(REQUEST, 0.3)
        assert time.monotonic() - started <= 0.3 + 0.25
    finally:
        limiter.close()


def test_a_dropped_stream_gives_its_lease_back_through_the_engine(redis_url, rdb):
    """A stream dropped mid-way is ended by its finalizer, which only hands the ending to the
    client's engine: the lease comes back on the engine's thread, never from inside the
    limiter (which therefore needs no guard against being re-entered)."""
    slots_key = f"cometkit:{fingerprint()}:all:slots"
    with Sandbox() as sandbox, cometkit.Client(KEY, sandbox.base_url, concurrency=2, config={
            "plugins": {"redis_limiter": {"url": redis_url, "max_concurrency": 1,
                                          "acquire_timeout": 10}}}) as client:
        for _ in range(3):  # each stream needs the one slot the one before it held
            stream = client.chat.completions.create(model="m1", messages=MESSAGES,
                                                    stream=True)
            next(iter(stream))
            assert live_leases(rdb, slots_key) == 1
            del stream
        answer = client.chat.completions.create(model="m1", messages=MESSAGES)
    assert answer.choices[0].message.content
    assert live_leases(rdb, slots_key) == 0


# -- the shared state, process by process ---------------------------------------------------


def test_one_burst_of_429s_cuts_the_shared_limit_once_and_successes_grow_it(redis_url):
    one, two = (RedisLimiter(url=redis_url, namespace="ns", max_concurrency=8)
                for _ in range(2))
    quick = {"retry-after-ms": "20"}
    try:
        permits = [(one, one.acquire(REQUEST, 1)) for _ in range(2)]
        permits += [(two, two.acquire(REQUEST, 1)) for _ in range(2)]
        with pytest.raises(RateLimitError):  # the initial shared limit is 4 (slow start)
            two.acquire(REQUEST, 0.1)
        for limiter, permit in permits:  # one burst: four 429s, one cut
            limiter.release(permit, result(429, headers=quick))
        assert one.stats()["models"]["m1"]["limit"] == 2  # 4 * 0.7
        assert two.stats()["models"]["m1"]["limit"] == 2

        permit = two.acquire(REQUEST, 1)  # admitted after the cut: its 429 is news
        two.release(permit, result(429, headers=quick))
        assert one.stats()["models"]["m1"]["limit"] == 1  # 2.8 * 0.7

        for _ in range(2):  # a window of successes (as many as the limit) adds one
            permit = one.acquire(REQUEST, 1)
            one.release(permit, result(200))
        assert two.stats()["models"]["m1"]["limit"] == 2
        assert one.stats()["in_flight"] == 0
    finally:
        one.close()
        two.close()


def test_tokens_are_charged_once_with_a_weight_and_corrected_from_usage(redis_url, rdb):
    limiter = RedisLimiter(url=redis_url, namespace="ns", max_concurrency=4,
                           tokens_per_minute=600, adaptive=False)  # 9.8 tokens/s, bucket 9.8
    # 100 tokens estimated from the prompt (no max_tokens: nothing the provider keeps)
    big = RequestInfo("ck-big", "chat", "POST", "/chat/completions", model="m1",
                      json={"messages": [{"role": "user", "content": "x" * 400}]})
    small = RequestInfo("ck-small", "chat", "POST", "/chat/completions", model="m1",
                        json={"messages": MESSAGES, "max_tokens": 1})
    try:
        permit = limiter.acquire(big, 1)  # more than the bucket: admitted, leaves a debt
        with pytest.raises(RateLimitError, match="shared rate limit"):
            limiter.acquire(small, 0.2)
        # One key per limit, whatever the weight: not one entry per token.
        assert sorted(rdb.keys("*")) == ["cometkit:ns:all:slots", "cometkit:ns:all:tpm"]
        # The server counted 2 tokens, not 100: the debt is given back.
        limiter.release(permit, AttemptResult(big, 1, status_code=200, input_tokens=1,
                                              output_tokens=1))
        limiter.release(limiter.acquire(small, 0.2), result(200))
    finally:
        limiter.close()


# -- what the fleet learned, shared ------------------------------------------------------------
#
# Two RedisLimiter instances stand for two processes (the same Redis and namespace); their
# adaptive policies run on an injected clock, so every learned rate below follows from the
# answers given, whatever the machine's speed. Redis times the shared keys in real time: the
# learned rates are kept low enough (0.5 calls/s, a few hundred tokens/s) that nothing the
# test does in between takes as long as one learned interval.

TOKENS_REQUEST = RequestInfo("ck-tok", "chat", "POST", "/chat/completions", model="m1",
                             json={"messages": [{"role": "user", "content": "x" * 4000}]})
QUICK_HINT = {"retry-after-ms": "1"}


def answered(request: RequestInfo, status: int, clock: FakeClock, sent_at: float,
             message: Optional[str] = None, **fields: Any) -> AttemptResult:
    headers = CaseInsensitiveDict(QUICK_HINT if status == 429 else {})
    out = AttemptResult(request, 1, status_code=status, headers=headers, started_at=sent_at,
                        duration_s=clock.monotonic() - sent_at, **fields)
    out.hints = parse_hints(headers, clock.time(), message if status == 429 else None)
    return out


def accept(limiter: RedisLimiter, clock: FakeClock, seconds: float,
           request: RequestInfo = REQUEST, **fields: Any) -> None:
    """One call of ``limiter``, in flight for ``seconds`` and accepted."""
    sent_at = clock.monotonic()
    permit = limiter.acquire(request, 5)
    clock.advance(seconds)
    limiter.release(permit, answered(request, 200, clock, sent_at, **fields))


def refuse(limiter: RedisLimiter, clock: FakeClock, request: RequestInfo = REQUEST,
           message: Optional[str] = None) -> None:
    sent_at = clock.monotonic()
    permit = limiter.acquire(request, 5)
    clock.advance(0.1)
    limiter.release(permit, answered(request, 429, clock, sent_at, message))
    clock.advance(0.01)  # past the 1 ms hold the refusal asked for (and Redis' own)
    time.sleep(0.01)


@pytest.fixture
def pair(redis_url: str) -> Iterator[tuple[RedisLimiter, RedisLimiter, FakeClock]]:
    clock = FakeClock()
    one, two = (RedisLimiter(url=redis_url, namespace="ns", max_concurrency=8, clock=clock)
                for _ in range(2))
    yield one, two, clock
    one.close()
    two.close()


def test_a_process_that_joins_sends_at_the_rate_the_fleet_learned_and_redis_holds_it(
        pair, rdb):
    one, two, clock = pair
    for _ in range(4):  # 4 calls accepted in 8 s of sending (2 s each): 0.5 calls/s
        accept(one, clock, 2.0)
    refuse(one, clock)
    permit = one.acquire(REQUEST, 5)  # the first admission after the hold learns the rate
    learned = one.stats()["models"]["m1"]["learned"]
    assert learned["rate_per_s"] == pytest.approx(0.5, rel=0.05)
    assert json.loads(rdb.hget("cometkit:ns:model:m1:learned", "rate_per_s")) == \
        learned["rate_per_s"]

    # A process that never saw a 429 sends at the fleet's rate from its first call ...
    with pytest.raises(RateLimitError, match="fleet's learned send or token rate"):
        two.acquire(REQUEST, 0.5)  # ... and that rate is the fleet's: one just sent
    assert two.stats()["models"]["m1"]["process"]["rate_per_s"] == learned["rate_per_s"]
    one.release(permit, answered(REQUEST, 200, clock, clock.monotonic()))


def test_the_learned_rate_is_measured_over_what_the_whole_fleet_had_accepted(pair):
    one, two, clock = pair
    sent_at = clock.monotonic()
    permit = one.acquire(REQUEST, 5)  # one call of one's, in flight for 4 s ...
    for _ in range(8):  # ... while two has 8 accepted
        accept(two, clock, 0.5)
    one.release(permit, answered(REQUEST, 200, clock, sent_at))
    refuse(one, clock)
    one.release(one.acquire(REQUEST, 5), answered(REQUEST, 200, clock, clock.monotonic()))
    # 9 acceptances in one's 4.1 s of sending (a little more: its pacing after the hold is
    # busy time too), not its own 1: the rate the server gives the fleet, about 2/s, where
    # one's own share would be under 0.25/s.
    rate = one.stats()["models"]["m1"]["learned"]["rate_per_s"]
    assert 9 / 4.6 <= rate <= 9 / 4.1
    two.acquire(REQUEST, 5)  # two takes it in with its next call
    assert two.stats()["models"]["m1"]["process"]["rate_per_s"] == pytest.approx(rate)


def test_a_learned_token_rate_is_shared_and_spent_by_the_whole_fleet(pair, rdb):
    one, two, clock = pair
    for _ in range(4):  # 4 calls of 500 tokens each in 4 s: 500 tokens/s
        accept(one, clock, 1.0, TOKENS_REQUEST, input_tokens=500, output_tokens=0)
    refuse(one, clock, TOKENS_REQUEST, "Rate limit reached for tokens per min")
    # The next admission learns the token rate and spends ~1000 estimated tokens of the
    # fleet's bucket (one second's worth of ~490 tokens/s): a debt of about a second.
    permit = one.acquire(TOKENS_REQUEST, 5)
    token_rate = one.stats()["models"]["m1"]["learned"]["token_rate_per_s"]
    assert 400 <= token_rate <= 500
    assert "rate_per_s" not in one.stats()["models"]["m1"]["learned"]  # tokens refused, only
    assert rdb.exists("cometkit:ns:model:m1:learned_tpm")
    with pytest.raises(RateLimitError, match="fleet's learned send or token rate"):
        two.acquire(TOKENS_REQUEST, 0.5)
    assert two.stats()["models"]["m1"]["process"]["token_rate_per_s"] == token_rate
    one.release(permit, answered(TOKENS_REQUEST, 200, clock, clock.monotonic(),
                                 input_tokens=1000, output_tokens=0))



def refuse_after(limiter: RedisLimiter, clock: FakeClock, retry_after: str) -> None:
    """One call of ``limiter`` refused with ``Retry-After: <retry_after>``."""
    sent_at = clock.monotonic()
    permit = limiter.acquire(REQUEST, 5)
    clock.advance(0.1)
    refused = AttemptResult(REQUEST, 1, status_code=429,
                            headers=CaseInsensitiveDict({"retry-after": retry_after}),
                            started_at=sent_at, duration_s=0.1)
    refused.hints = parse_hints(refused.headers, clock.time())
    limiter.release(permit, refused)


def learn_window(limiter: RedisLimiter, clock: FakeClock) -> None:
    """A run of 3 acceptances, then "Retry-After: 2": ``limiter`` takes it for a 2-second
    window of 3 calls; then past the window's end (and, in real time, the fleet's hold)."""
    for _ in range(3):
        accept(limiter, clock, 0.5)
    refuse_after(limiter, clock, "2")
    clock.advance(0.5)
    time.sleep(0.5)
    known = limiter.stats()["models"]["m1"]["process"]
    assert (known["window_s"], known["window_quota"]) == (2, 3)


def test_a_window_and_a_ceiling_are_taken_by_a_process_that_has_not_met_them(pair):
    one, two, clock = pair
    learn_window(one, clock)
    # Then a cap on calls in flight refuses the third of three: one keeps at most 2.
    permits = [one.acquire(REQUEST, 5) for _ in range(3)]
    one.release(permits[2], answered(REQUEST, 429, clock, clock.monotonic(),
                                     "Too many parallel requests"))
    for permit in permits[:2]:
        one.release(permit, answered(REQUEST, 200, clock, clock.monotonic()))
    time.sleep(2.1)  # those 3 were the window's quota, for the fleet, in Redis' time
    one.release(one.acquire(REQUEST, 5), answered(REQUEST, 200, clock, clock.monotonic()))
    learned = one.stats()["models"]["m1"]["learned"]
    assert (learned["window_s"], learned["window_quota"], learned["ceiling"]) == (2, 3, 2)

    two.release(two.acquire(REQUEST, 5), answered(REQUEST, 200, clock, clock.monotonic()))
    process = two.stats()["models"]["m1"]["process"]
    assert (process["window_s"], process["window_quota"], process["ceiling"]) == (2, 3, 2)
    assert process["limit"] <= 2


def test_a_known_window_admits_its_quota_once_per_window_for_the_whole_fleet(pair):
    """The window's quota is the server's, for the fleet: what the processes admit together
    in one window, not each of them (two would send twice the quota as the window opens)."""
    one, two, clock = pair
    learn_window(one, clock)
    held = [one.acquire(REQUEST, 5), two.acquire(REQUEST, 5), one.acquire(REQUEST, 5)]
    with pytest.raises(RateLimitError, match="quota of a window"):
        two.acquire(REQUEST, 0.3)
    assert two.stats()["models"]["m1"]["process"]["window_quota"] == 3
    time.sleep(2.1)  # the window ends in Redis' time: the next one opens for anyone
    held.append(two.acquire(REQUEST, 5))
    for permit in held:
        one.release(permit, answered(REQUEST, 200, clock, clock.monotonic()))


def refused_rank(limiter: RedisLimiter, permit: Any, clock: FakeClock,
                 retry_after: str = "2") -> None:
    """``permit``'s attempt refused with the learned window's own ``Retry-After``."""
    refused = AttemptResult(REQUEST, 1, status_code=429,
                            headers=CaseInsensitiveDict({"retry-after": retry_after}),
                            started_at=clock.monotonic(), duration_s=0.0)
    refused.hints = parse_hints(refused.headers, clock.time())
    limiter.release(permit, refused)


def test_a_fleet_quota_still_open_is_polled_raised_at_once_and_slept_on_once_fixed(pair):
    """A learned window's quota may be short (counted from what one process had heard of)
    until a refused rank fixes it. Until then a call it turns away looks again at the pace
    of polls, not asleep to the window's end, and a quota raised by an accepted probe in
    another process admits it at its first look; once a refused rank anywhere in the fleet
    has fixed the quota, a call turned away sleeps (here: to its deadline)."""
    one, two, clock = pair
    learn_window(one, clock)  # a 2 s window of 3 calls, quota not yet fixed
    held = [two.acquire(REQUEST, 5)]  # two takes the window in, with its first rank
    held += [one.acquire(REQUEST, 5), one.acquire(REQUEST, 5)]
    assert [permit.window_rank for permit in held] == [1, 2, 3]
    clock.sleeps.clear()
    with pytest.raises(RateLimitError, match="quota of a window"):
        two.acquire(REQUEST, 0.3)
    assert len(clock.sleeps) > 1 and max(clock.sleeps) <= POLL_MAX_S  # polled

    # The quota's last rank accepted in one: the quota may be higher, one tries 4 and says
    # so at once; two, still counting 3, is admitted by the fleet's 4 without a second look.
    one.release(held.pop(), answered(REQUEST, 200, clock, clock.monotonic()))
    assert one.stats()["models"]["m1"]["process"]["window_quota"] == 4
    clock.sleeps.clear()
    fourth = two.acquire(REQUEST, 5)
    assert fourth.window_rank == 4 and clock.sleeps == []

    # The 4th refused: the quota is 3, fixed, for the fleet. one, that has not heard of it
    # yet, takes it in with its next look and then sleeps instead of polling.
    refused_rank(two, fourth, clock)
    assert two.stats()["models"]["m1"]["process"]["window_quota"] == 3
    clock.sleeps.clear()
    with pytest.raises(RateLimitError, match="quota of a window"):
        one.acquire(REQUEST, 0.3)
    assert clock.sleeps == [pytest.approx(0.3)]
    for permit in held:
        one.release(permit, answered(REQUEST, 200, clock, clock.monotonic()))


def test_a_learned_ceiling_caps_the_fleets_calls_in_flight_not_each_processs(pair, rdb):
    """A cap on calls in flight counts the server's, whoever sent them: refused at the
    fleet's fourth, the fleet keeps 3 in flight together -- the process that did not meet
    the cap included, from its very next admission."""
    one, two, clock = pair
    held = [one.acquire(REQUEST, 5), one.acquire(REQUEST, 5), two.acquire(REQUEST, 5)]
    fourth = two.acquire(REQUEST, 5)  # the fleet's 4th in flight, two's 2nd
    two.release(fourth, answered(REQUEST, 429, clock, clock.monotonic(),
                                 "Too many parallel requests"))
    assert two.stats()["models"]["m1"]["learned"]["ceiling"] == 3
    with pytest.raises(RateLimitError, match="shared concurrency slot"):
        one.acquire(REQUEST, 0.3)  # 3 in flight: one's 3rd would be the fleet's 4th
    one.release(held.pop(0), answered(REQUEST, 200, clock, clock.monotonic()))
    held.append(one.acquire(REQUEST, 5))
    assert live_leases(rdb, "cometkit:ns:model:m1:slots") == 3
    for permit in held:
        one.release(permit, answered(REQUEST, 200, clock, clock.monotonic()))


def test_a_window_found_wrong_is_withdrawn_from_the_fleet(pair, rdb):
    """A hint that differs from the assumed window's length was a time left after all: the
    process that assumed the window drops it, and so does one that had taken it in."""
    one, two, clock = pair
    learn_window(one, clock)
    two.release(two.acquire(REQUEST, 5), answered(REQUEST, 200, clock, clock.monotonic()))
    assert two.stats()["models"]["m1"]["process"]["window_s"] == 2
    time.sleep(2.1)
    refuse_after(one, clock, "7")  # not the window's 2 s: it was no window
    assert one.stats()["models"]["m1"]["process"]["window_s"] is None
    assert json.loads(rdb.hget("cometkit:ns:model:m1:learned", "window_s")) is None
    clock.advance(8)
    time.sleep(0.1)
    rdb.delete("cometkit:ns:model:m1:hold")  # the 7 s hold is not what this test is about
    two.release(two.acquire(REQUEST, 5), answered(REQUEST, 200, clock, clock.monotonic()))
    assert two.stats()["models"]["m1"]["process"]["window_s"] is None


def test_keys_are_namespaced_by_a_hash_of_the_api_key_and_never_contain_it(redis_url, rdb):
    config = {"plugins": {"redis_limiter": {
        "url": redis_url, "key_prefix": "ck-test", "requests_per_minute": 6000,
        "tokens_per_minute": 600000, "models": {"m2": {"requests_per_minute": 3000,
                                                       "tokens_per_minute": 300000}}}}}
    with Sandbox() as sandbox, cometkit.Client(KEY, sandbox.base_url, concurrency=4,
                                               config=config) as client:
        list(client.map(lambda i: client.chat.completions.create(
            model=("m1", "m2")[i % 2], messages=MESSAGES), range(8)))
        namespace = client.context.api_key_fingerprint
    keys = rdb.keys("*")
    assert len(namespace) == 16 and namespace not in KEY
    assert keys and all(k.startswith(f"ck-test:{namespace}:") for k in keys), keys
    assert {k for k in keys if k.endswith("rpm")} == {
        f"ck-test:{namespace}:all:rpm", f"ck-test:{namespace}:model:m2:rpm"}
    stored = []
    for key in keys:
        kind = rdb.type(key)
        if kind == "string":
            stored.append(rdb.get(key))
        elif kind == "zset":
            stored.extend(rdb.zrange(key, 0, -1))
        elif kind == "hash":
            stored.extend(f"{k}={v}" for k, v in rdb.hgetall(key).items())
    assert not any(KEY in text or "sk-" in text for text in keys + stored)


# -- when Redis is not there -----------------------------------------------------------------


@contextmanager
def silent_server() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"redis://:hunter2@127.0.0.1:{sock.getsockname()[1]}/0"


@contextmanager
def refusing_server() -> Iterator[str]:
    yield f"redis://:hunter2@127.0.0.1:{free_port()}/0"


def run_calls(base_url: str, options: dict, calls: int, threads: int) -> list[Any]:
    with cometkit.Client(KEY, base_url, concurrency=threads,
                         config={"plugins": {"redis_limiter": options}}) as client:
        return list(client.map(
            lambda _: client.chat.completions.create(model="m1", messages=MESSAGES),
            range(calls), return_exceptions=True))


@pytest.mark.parametrize("dead_redis", [refusing_server, silent_server])
def test_without_redis_the_local_limiter_takes_over_with_one_warning(dead_redis, caplog):
    caplog.set_level(logging.WARNING, logger="cometkit.redis_limiter")
    with dead_redis() as url, Sandbox(latency_s=0.05) as sandbox:
        started = time.monotonic()
        results = run_calls(sandbox.base_url, {"url": url, "max_concurrency": 2,
                                               "socket_timeout": 0.2}, calls=12, threads=6)
        elapsed_s = time.monotonic() - started
        stats = sandbox.stats()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert stats["max_in_flight_seen"] <= 2  # the in-process limiter applies the options
    warnings = [r for r in caplog.records if r.name == "cometkit.redis_limiter"]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert "hunter2" not in caplog.text
    # Never hung on the dead Redis: a few socket timeouts at most, then local admission.
    assert elapsed_s < 10


def test_fail_open_admits_without_limits_when_redis_is_unreachable():
    with refusing_server() as url, Sandbox(latency_s=0.1) as sandbox:
        results = run_calls(sandbox.base_url, {"url": url, "max_concurrency": 1,
                                               "on_redis_error": "fail_open"},
                            calls=8, threads=4)
        stats = sandbox.stats()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert stats["max_in_flight_seen"] > 1


def test_fail_closed_refuses_when_redis_is_unreachable():
    with refusing_server() as url, Sandbox() as sandbox:
        results = run_calls(sandbox.base_url, {"url": url, "on_redis_error": "fail_closed"},
                            calls=3, threads=1)
        attempts = sandbox.stats()["attempts"]
    assert all(isinstance(r, RateLimitError) and "fail_closed" in str(r) for r in results)
    assert "hunter2" not in str(results[0])
    assert attempts == 0


def test_it_goes_back_to_redis_once_redis_answers_again():
    port = free_port()
    limiter = RedisLimiter(url=f"redis://127.0.0.1:{port}/0", namespace="ns",
                           max_concurrency=2, reconnect_interval_s=0.1)
    try:
        permit = limiter.acquire(REQUEST, 1)
        assert limiter.stats()["backend"] == "local"
        limiter.release(permit, result(200))
        with RedisServer(port=port) as server:
            backend = "local"
            for _ in range(50):  # bounded: a few reconnect intervals are enough
                time.sleep(0.1)
                permit = limiter.acquire(REQUEST, 1)
                backend = limiter.stats()["backend"]
                if backend == "redis":
                    break
                limiter.release(permit, result(200))
            assert backend == "redis"
            client = redis.Redis.from_url(server.url)
            assert client.zcard("cometkit:ns:all:slots") == 1
            limiter.release(permit, result(200))
            assert client.zcard("cometkit:ns:all:slots") == 0
            client.close()
    finally:
        limiter.close()


def test_a_null_url_means_redis_url_from_the_environment(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://redis.example.invalid:6380/2")
    assert RedisLimiter(max_concurrency=1).url == "redis://redis.example.invalid:6380/2"
    monkeypatch.setenv("REDIS_URL", "")
    assert RedisLimiter(max_concurrency=1).url == DEFAULT_URL
    assert RedisLimiter(max_concurrency=1, url="redis://other:1/0").url == "redis://other:1/0"


# -- the example -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_shared_limit_example_runs_a_fleet_under_one_limit(redis_url):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "shared_limit.py"), "--redis-url", redis_url,
         "--workers", "3", "--threads", "4", "--calls", "12", "--max-concurrency", "4",
         "--latency", "0.05", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ok"] == 36 and summary["failed"] == 0, summary
    assert 1 <= summary["max_in_flight_seen"] <= 4
