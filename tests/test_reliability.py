"""Reliability under failure, end to end: a retry storm, every fault kind, many threads.

Real client, real loopback servers (the sandbox, or the scripted server where a fault must hit
one given attempt), real threads and the real clock with millisecond delays, so that nothing
here sleeps for long. Every wait is bounded: threads are joined and futures awaited with a
timeout, and each test carries a pytest-timeout marker. The bounds asserted are counts and
ceilings (attempts, rows, "returned before this generous limit"), never speeds.

Batch interruption (SIGKILL mid-run, Ctrl-C) is covered in tests/test_cli_batch.py.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import random
import threading
import time
from collections import Counter
from typing import Any, Callable, Optional

import pytest
from scripted_server import Reply, ScriptedServer, chat_body, json_reply, wait_until

import cometkit
from cometkit import (
    ATTEMPT_FIELDS,
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    InternalServerError,
    RateLimitError,
)
from cometkit.sandbox import Sandbox

KEY = "sk-reliability-test"
MESSAGES = [{"role": "user", "content": "hello"}]
#: Every retryable failure opted in.
ALL_RETRYABLE = [429, 500, 502, 503, 504, "connect", "read"]
#: Backoff with millisecond waits: the tests exercise the decisions, not the sleeping.
FAST_BACKOFF = {"base_delay": 0.005, "max_delay": 0.02, "jitter": "full"}
#: How long a call may take before it counts as hung (a ceiling, far above any real run).
HANG_S = 30.0


def call_with_ceiling(fn: Callable[[], Any], ceiling_s: float = HANG_S) -> Any:
    """``fn()`` on another thread: its value or its exception, or a test failure if it is
    still running after ``ceiling_s`` (so the test fails instead of hanging)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn())
        except Exception as exc:
            outcome.append(exc)

    caller = threading.Thread(target=run, name="test-call", daemon=True)
    caller.start()
    caller.join(ceiling_s)
    if caller.is_alive():  # pragma: no cover - the failure this guards against
        pytest.fail(f"the call did not end within {ceiling_s} s")
    return outcome[0]


def close_within(client: cometkit.Client, ceiling_s: float = 10.0) -> None:
    closer = threading.Thread(target=client.close, name="test-close")
    closer.start()
    closer.join(ceiling_s)
    assert not closer.is_alive(), f"client.close() did not return within {ceiling_s} s"


def pool_threads() -> set:
    """The worker threads of cometkit clients (ThreadPoolExecutor names them ``cometkit_N``)."""
    return {t for t in threading.enumerate() if t.name.startswith("cometkit_")}


# -------------------------------------------------------------------------------------------
# Retry storm
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_retry_storm_is_bounded_by_the_budget_and_every_call_ends():
    """A server answering 429 to everything: N calls from 16 threads make at most
    ``N * (1 + budget_ratio) + budget_floor + concurrency`` attempts, all end in
    RateLimitError, nothing hangs and the client closes."""
    calls, concurrency = 200, 16
    ratio, floor, window = 0.2, 5, 10.0  # the backoff defaults (not set below)
    before = pool_threads()
    # retry-after-ms: 1 -> each retry waits ~1 ms (plus up to 10 % jitter)
    with Sandbox(always_429=True, retry_after="ms", retry_after_value_s=0.001) as sandbox:
        client = cometkit.Client(KEY, sandbox.base_url, concurrency=concurrency,
                                 rng=random.Random(7),
                                 config={"plugins": {"backoff": FAST_BACKOFF}})
        results: list = []
        started = time.monotonic()

        def consume() -> None:
            results.extend(client.map(
                lambda i: client.chat.completions.create(model="m1", messages=MESSAGES),
                range(calls), return_exceptions=True))

        runner = threading.Thread(target=consume, name="test-storm")
        runner.start()
        runner.join(HANG_S)
        assert not runner.is_alive(), "client.map did not finish: a thread hangs"
        elapsed = time.monotonic() - started
        close_within(client)
        stats = sandbox.stats()

    assert len(results) == calls
    assert all(isinstance(r, RateLimitError) for r in results), Counter(
        type(r).__name__ for r in results)
    # The budget allows ratio * calls + floor retries per window (windows slide in tenths of
    # `window`); a storm longer than one window may add `floor` per further window. The storm
    # takes well under a second here, so the extra term is 0 -- it only keeps the bound
    # honest on a very slow machine.
    extra_windows = math.floor(elapsed / (0.9 * window))
    # Plus one wave (the concurrency) of first refusals, which wait in the limiter for a
    # moment before it is clear that the server accepts nothing at all.
    ceiling = calls * (1 + ratio) + floor * (1 + extra_windows) + concurrency
    attempts = stats["attempts"]
    assert calls < attempts <= ceiling, (attempts, ceiling)  # it did retry, within budget
    assert stats["attempts_by_status"] == {429: attempts}
    assert client.stats == {"calls": calls, "attempts": attempts, "retries": attempts - calls,
                            "failures": calls, "sink_errors": 0}
    exhausted = [r for r in results if str(r).startswith("retry budget exhausted:")]
    assert exhausted, "some calls must fail fast on the spent budget"
    assert all(r.status_code == 429 for r in results)
    assert stats["in_flight"] == 0
    assert pool_threads() - before == set(), "the client's worker threads outlived close()"


# -------------------------------------------------------------------------------------------
# Every fault kind x default and opted-in retry
# -------------------------------------------------------------------------------------------

READ_TIMEOUT_S = 0.4


class Fault:
    """A fault kind and what a call must end with when it hits every attempt."""

    def __init__(self, kind: str, error: type, *, stage: Optional[str] = None,
                 retryable: bool, not_an: tuple = ()) -> None:
        self.kind = kind
        self.error = error
        self.stage = stage
        #: Retried once the matching ``retry_on`` entry is opted in.
        self.retryable = retryable
        #: More specific classes the error must not be (a reset is no timeout).
        self.not_an = not_an

    def __repr__(self) -> str:
        return self.kind


FAULTS = [
    Fault("500", InternalServerError, retryable=True),
    Fault("502", InternalServerError, retryable=True),
    Fault("503", InternalServerError, retryable=True),
    Fault("504", InternalServerError, retryable=True),
    Fault("html502", InternalServerError, retryable=True),
    # a 200 whose body does not parse: the server did the work, so it is never sent again
    Fault("invalid_json", APIError, retryable=False,
          not_an=(APIStatusError, APIConnectionError)),
    Fault("truncated", APIConnectionError, stage="read", retryable=True,
          not_an=(APITimeoutError,)),
    Fault("reset", APIConnectionError, stage="read", retryable=True, not_an=(APITimeoutError,)),
    Fault("slow", APITimeoutError, stage="read", retryable=True),
    # 429 insufficient_quota: waiting cannot help, whatever retry_on says
    Fault("quota", RateLimitError, retryable=False),
]

MODES = {
    "default": {},
    "opted-in": {"retry_on": ALL_RETRYABLE, "max_attempts": 3, **FAST_BACKOFF},
}


def fault_client(base_url: str, mode: str) -> cometkit.Client:
    return cometkit.Client(KEY, base_url, timeout={"connect": 5, "read": READ_TIMEOUT_S},
                           rng=random.Random(3),
                           config={"plugins": {"backoff": MODES[mode]}})


def assert_ends_with(fault: Fault, outcome: Any) -> None:
    assert isinstance(outcome, fault.error), f"{fault.kind}: got {outcome!r}"
    assert not isinstance(outcome, fault.not_an), f"{fault.kind}: got {outcome!r}"
    if fault.stage is not None:
        assert outcome.stage == fault.stage
    if isinstance(fault.error, type) and issubclass(fault.error, APIStatusError):
        expected = 429 if fault.kind == "quota" else 502 if fault.kind == "html502" \
            else int(fault.kind)
        assert outcome.status_code == expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_every_attempt_faulted_ends_in_the_typed_error(fault, mode):
    """The sandbox faults every attempt: the call ends in the fault's typed exception, sent
    once by default; opted in, retryable faults are sent max_attempts times, the others
    once."""
    with Sandbox(faults={fault.kind: 1.0}, slow_s=10.0, seed=1) as sandbox:
        client = fault_client(sandbox.base_url, mode)
        try:
            # ceiling: every attempt may take the read timeout, plus generous slack
            outcome = call_with_ceiling(
                lambda: client.chat.completions.create(model="m1", messages=MESSAGES))
        finally:
            close_within(client)
        stats = sandbox.stats()

    assert_ends_with(fault, outcome)
    retried = mode == "opted-in" and fault.retryable
    expected_attempts = MODES["opted-in"]["max_attempts"] if retried else 1
    assert stats["attempts"] == expected_attempts
    assert stats["faults_injected"] == {fault.kind: expected_attempts}
    assert client.stats["attempts"] == expected_attempts
    assert client.stats["retries"] == expected_attempts - 1
    if retried:
        assert str(outcome).startswith(f"gave up after {expected_attempts} attempts")
        assert isinstance(outcome.__cause__, fault.error)


def first_attempt_fails(kind: str) -> Callable:
    """A scripted server whose first answer is the fault, every later one a completion."""
    fault = {
        "500": json_reply(500, {"error": {"message": "boom", "type": "server_error"}}),
        "502": json_reply(502, {"error": {"message": "Bad gateway."}}),
        "503": json_reply(503, {"error": {"message": "overloaded"}}),
        "504": json_reply(504, {"error": {"message": "Gateway timeout."}}),
        "html502": Reply(502, b"<html><head><title>502 Bad Gateway</title></head></html>",
                         {"Content-Type": "text/html"}),
        "invalid_json": Reply(200, b'{"id": "x", "choices": [<!-- cut -->',
                              {"Content-Type": "application/json"}),
        "truncated": Reply(200, json.dumps(chat_body()).encode(), action="truncate"),
        "reset": Reply(action="reset"),
        "slow": Reply(200, json.dumps(chat_body()).encode(), delay_s=READ_TIMEOUT_S * 10),
        "quota": json_reply(429, {"error": {"message": "You exceeded your current quota",
                                            "code": "insufficient_quota"}}),
    }[kind]
    lock = threading.Lock()
    state = {"n": 0}

    def handler(seen: Any) -> Reply:
        with lock:
            state["n"] += 1
            first = state["n"] == 1
        return fault if first else json_reply(200, chat_body())

    return handler


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_opted_in_retry_recovers_from_one_fault(fault):
    """A fault on the first attempt only: opted-in retry turns it into a value on the second
    attempt; faults that must not be retried still end the call after one attempt."""
    with ScriptedServer(first_attempt_fails(fault.kind)) as server:
        client = fault_client(server.base_url, "opted-in")
        try:
            outcome = call_with_ceiling(
                lambda: client.chat.completions.create(model="m1", messages=MESSAGES))
        finally:
            close_within(client)
        count = server.count

    if fault.retryable:
        assert not isinstance(outcome, Exception), f"{fault.kind}: got {outcome!r}"
        assert outcome.model == "m1"
        assert count == 2
        assert client.stats == {"calls": 1, "attempts": 2, "retries": 1, "failures": 0,
                                "sink_errors": 0}
    else:
        assert_ends_with(fault, outcome)
        assert count == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind, error", [("truncated", APIConnectionError),
                                         ("invalid_json", APIError)])
def test_a_stream_broken_midway_ends_in_the_typed_error_and_frees_its_slot(kind, error, mode):
    """A stream fails after its answer began: the error surfaces from the iteration, the
    attempt is not sent again (the caller already has part of the answer), and its limiter
    slot comes back -- on a client with one slot, the next stream still gets through."""
    with Sandbox(faults={kind: 1.0}) as sandbox:
        client = cometkit.Client(KEY, sandbox.base_url, concurrency=1,
                                 timeout={"connect": 5, "read": READ_TIMEOUT_S},
                                 config={"plugins": {"backoff": MODES[mode]}})

        def read_stream() -> Any:
            stream = client.chat.completions.create(model="m1", messages=MESSAGES,
                                                    stream=True)
            return list(stream)

        try:
            outcomes = [call_with_ceiling(read_stream) for _ in range(2)]
        finally:
            close_within(client)
        stats = sandbox.stats()
    for outcome in outcomes:
        assert isinstance(outcome, error), repr(outcome)
        assert not isinstance(outcome, (APIStatusError, APITimeoutError))
        if error is APIConnectionError:
            assert outcome.stage == "read"
    assert stats["attempts"] == 2  # one per call, opted in or not
    assert client.stats == {"calls": 2, "attempts": 2, "retries": 0, "failures": 2,
                            "sink_errors": 0}


# -------------------------------------------------------------------------------------------
# Many threads, one client, CSV and stdout sinks
# -------------------------------------------------------------------------------------------

THREADS = 64
# 64 threads x 1000 calls, as the issue asks: 45-110 s on a 2-core machine (as busy as its
# host is), the longest test.
CALLS_PER_THREAD = 1000
#: The workers hang if no call at all finishes for this long (a throughput bound would fail
#: on a slow machine, not on a hang) ...
NO_PROGRESS_S = 20.0
#: ... and must be done within this, under the test's own timeout.
WORKERS_CAP_S = 270.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_64_threads_on_one_client_write_one_whole_row_and_line_per_attempt(tmp_path, capsys):
    csv_path = tmp_path / "attempts.csv"
    config = {
        "concurrency": THREADS,
        "plugins": {
            # 2 % of attempts fail with a 503 and are retried, so attempts != calls
            "backoff": {"retry_on": [429, 503], **FAST_BACKOFF},
            "csv_metrics": {"path": str(csv_path)},
            "stdout_metrics": {"format": "json", "per_attempt": True, "summary": True},
        },
    }
    errors: list = []
    finished: list = []  # one item per call done (list.append is atomic)
    with Sandbox(faults={"503": 0.02}, seed=11) as sandbox:
        client = cometkit.Client(KEY, sandbox.base_url, config=config, rng=random.Random(5))

        def worker() -> None:
            try:
                for _ in range(CALLS_PER_THREAD):
                    client.chat.completions.create(model="m1", messages=MESSAGES)
                    finished.append(None)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, name=f"test-worker-{i}")
                   for i in range(THREADS)]
        for thread in threads:
            thread.start()
        stop_at = time.monotonic() + WORKERS_CAP_S
        seen, progressed_at = 0, time.monotonic()
        while (alive := [t for t in threads if t.is_alive()]) and time.monotonic() < stop_at:
            alive[0].join(1.0)
            if len(finished) != seen:
                seen, progressed_at = len(finished), time.monotonic()
            assert time.monotonic() - progressed_at < NO_PROGRESS_S, (
                f"worker threads hang: no call finished in {NO_PROGRESS_S:g} s "
                f"({seen} of {THREADS * CALLS_PER_THREAD} done)")
        assert not alive, f"worker threads not done within {WORKERS_CAP_S:g} s"
        close_within(client, 30)
        server = sandbox.stats()

    assert errors == []
    calls = THREADS * CALLS_PER_THREAD
    stats = client.stats
    attempts = stats["attempts"]
    assert stats["calls"] == calls and stats["failures"] == 0 and stats["sink_errors"] == 0
    assert attempts == server["attempts"] == calls + stats["retries"]
    assert stats["retries"] == server["attempts_by_status"].get(503, 0) > 0

    # CSV: a header, then exactly one row per attempt, each complete and on its own line
    raw = csv_path.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.decode("utf-8").split("\n")[:-1]
    assert len(lines) == attempts + 1
    rows = list(csv.reader(lines))
    assert rows[0] == list(ATTEMPT_FIELDS)
    body = rows[1:]
    width = len(ATTEMPT_FIELDS)
    torn = [row for row in body if len(row) != width]
    assert torn == [], f"{len(torn)} rows without exactly {width} fields, e.g. {torn[:2]}"
    index = {name: i for i, name in enumerate(ATTEMPT_FIELDS)}
    outcomes = Counter(row[index["outcome"]] for row in body)
    assert outcomes == {"ok": calls, "retry": stats["retries"]}
    keys = {(row[index["request_id"]], row[index["attempt"]]) for row in body}
    assert len(keys) == attempts  # no row written twice
    assert len({row[index["request_id"]] for row in body}) == calls

    # stdout: one whole JSON line per attempt, then the summary object
    out = capsys.readouterr().out
    assert out.endswith("\n")
    parsed = [json.loads(line) for line in out.splitlines()]  # a torn line would not parse
    attempt_lines = [obj for obj in parsed if "summary" not in obj]
    assert len(attempt_lines) == attempts
    assert all(list(obj) == list(ATTEMPT_FIELDS) for obj in attempt_lines)
    assert len(parsed) - len(attempt_lines) == 1
    assert Counter(obj["outcome"] for obj in attempt_lines) == outcomes


# -------------------------------------------------------------------------------------------
# Leaving a stream early
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_leaving_stream_loops_with_break_frees_slots_without_the_garbage_collector():
    """``break`` out of ``for chunk in stream`` ten times on a limiter of two slots, with the
    cyclic garbage collector off: each stream's slot must come back as soon as the stream is
    unreachable, so the next call is admitted (a cycle between the stream and its iterator
    would keep every slot until ``gc`` runs: the third call would wait forever)."""
    config = {"plugins": {"limiter": {"max_concurrency": 2, "acquire_timeout": 5}}}
    events = [json.dumps({"id": "c", "model": "m1", "choices": [{"delta": {"content": "x"}}]})
              ] * 3 + ["[DONE]"]
    was_enabled = gc.isenabled()

    def handler(seen: Any) -> Reply:
        return Reply(200, events=events) if seen.json().get("stream") else \
            json_reply(200, chat_body())

    with ScriptedServer(handler) as server:
        client = cometkit.Client(KEY, server.base_url, config=config)
        gc.disable()
        try:
            def break_out_ten_times() -> int:
                first_chunks = 0
                for i in range(10):
                    if i % 2:  # the stream held in a variable, then replaced
                        stream = client.chat.completions.create(model="m1", messages=MESSAGES,
                                                                stream=True)
                        for _chunk in stream:
                            first_chunks += 1
                            break
                    else:  # the stream only ever held by the for loop
                        for _chunk in client.chat.completions.create(
                                model="m1", messages=MESSAGES, stream=True):
                            first_chunks += 1
                            break
                return first_chunks

            outcome = call_with_ceiling(break_out_ten_times)
            assert outcome == 10, repr(outcome)
            # and a plain call after them is admitted as well
            after = call_with_ceiling(
                lambda: client.chat.completions.create(model="m1", messages=MESSAGES))
            assert not isinstance(after, Exception), repr(after)
        finally:
            if was_enabled:
                gc.enable()
            close_within(client)
    assert server.count == 11
    assert client.stats["calls"] == 11 and client.stats["attempts"] == 11


class ThreadRecordingLimiter:
    """A limiter plugin that admits everything and records the thread of every release."""

    __name__ = "thread_recording_limiter"

    def __init__(self) -> None:
        self.release_threads: list = []

    @cometkit.hookimpl
    def cometkit_make_limiter(self, ctx: Any) -> Any:
        return self

    def acquire(self, request: Any, timeout_s: Any) -> object:
        return object()

    def release(self, permit: Any, result: Any) -> None:
        self.release_threads.append(threading.current_thread())

    def close(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_a_dropped_stream_hands_its_release_to_the_engine_not_the_dropping_thread(monkeypatch):
    """The moment a stream becomes unreachable can fall inside any lock (the limiter's own,
    a sink's); releasing right there could deadlock. The finalizer only enqueues: the
    release runs on the client's reaper thread, with no further call needed."""
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "")  # this limiter alone
    limiter = ThreadRecordingLimiter()
    events = [json.dumps({"id": "c", "choices": [{"delta": {"content": "x"}}]})] * 2
    with ScriptedServer(lambda seen: Reply(200, events=events)) as server, \
            cometkit.Client(KEY, server.base_url, extra_plugins=[limiter]) as client:
        stream = client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
        next(iter(stream))
        del stream  # unreachable now: reference counting alone ends it
        assert wait_until(lambda: len(limiter.release_threads) == 1)
        (thread,) = limiter.release_threads
        assert thread is not threading.current_thread()
        assert thread.name == "cometkit-stream-reaper"
