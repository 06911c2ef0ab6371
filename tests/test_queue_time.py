"""Queue time end to end: every attempt's wait for admission (``queue_s``) and every call's
split (queue / wire / back-off), through ``Client``, the ``requests`` adapter and
``cometkit batch``, against the sandbox and loopback servers.

The in-process tests share one fake clock between the client (and so its limiter, which
sleeps on it) and the server, so every wait is exact and nothing sleeps; the batch test runs
the real command with the real clock and checks only what must hold whatever the timing.
"""

from __future__ import annotations

import csv
import json
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest
import requests
from fakes import FakeClock, FixedRandom
from scripted_server import Reply, ScriptedServer, chat_body, json_reply
from test_cli_batch import cli_env, config_for, run_cli, write_prompts

import cometkit
from cometkit import ATTEMPT_FIELDS, CALL_FIELDS, AttemptResult, RequestInfo, RetryDecision
from cometkit.adapters import CometAdapter
from cometkit.sandbox import Sandbox

KEY = "sk-test-queue-time"
MESSAGES = [{"role": "user", "content": "hi"}]
#: One request a second, no burst beyond it, no safety margin: the n-th quick call waits 1 s.
PACED = {"requests_per_minute": 60, "burst": 1, "safety_margin": 0, "adaptive": False}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def metrics_plugins(tmp_path: Path, **more) -> dict:
    return {"csv_metrics": {"path": str(tmp_path / "attempts.csv"),
                            "calls_path": str(tmp_path / "calls.csv")}, **more}


def seconds(rows: list[dict], column: str) -> list[float]:
    return [float(row[column]) for row in rows]


def assert_calls_add_up(attempts: list[dict], calls: list[dict], *, exact: bool) -> None:
    """Each call's parts are its attempts' sums, and they never exceed the call's total
    (with a fake clock nothing else takes time, so they are the total)."""
    for call in calls:
        mine = [row for row in attempts if row["request_id"] == call["request_id"]]
        assert len(mine) == int(call["attempts"])
        assert float(call["queue_s"]) == pytest.approx(sum(seconds(mine, "queue_s")), abs=1e-5)
        assert float(call["wire_s"]) == pytest.approx(sum(seconds(mine, "duration_s")), abs=1e-5)
        assert float(call["backoff_s"]) == pytest.approx(
            sum(float(row["retry_delay_s"] or 0) for row in mine), abs=1e-5)
        parts = float(call["queue_s"]) + float(call["wire_s"]) + float(call["backoff_s"])
        if exact:
            assert parts == pytest.approx(float(call["duration_s"]), abs=1e-6)
        else:
            assert parts <= float(call["duration_s"]) + 3e-6


def test_files_carry_the_new_columns():
    assert ATTEMPT_FIELDS[-1] == "queue_s"
    assert CALL_FIELDS[-3:] == ("queue_s", "wire_s", "backoff_s")


def test_a_paced_client_records_each_calls_wait_for_admission(tmp_path):
    clock = FakeClock()
    with Sandbox() as sandbox:
        with cometkit.Client(KEY, sandbox.base_url, clock=clock,
                             plugins={"limiter": PACED, **metrics_plugins(tmp_path)}) as client:
            for _ in range(3):
                client.chat.completions.create(model="m1", messages=MESSAGES)
    attempts, calls = read_csv(tmp_path / "attempts.csv"), read_csv(tmp_path / "calls.csv")
    assert seconds(attempts, "queue_s") == pytest.approx([0.0, 1.0, 1.0], abs=1e-6)
    assert seconds(calls, "queue_s") == pytest.approx([0.0, 1.0, 1.0], abs=1e-6)
    assert seconds(calls, "duration_s") == pytest.approx([0.0, 1.0, 1.0], abs=1e-6)
    assert {row["backoff_s"] for row in calls} == {"0"}
    assert_calls_add_up(attempts, calls, exact=True)


def test_the_retry_policy_sees_where_the_call_s_time_went_so_far():
    """``AttemptResult.timing`` is one value per call that the core fills as the call runs:
    a policy (or a deadline) reads the sums instead of adding them up again."""
    seen: list = []

    class Recorder:
        def on_call_start(self, request: RequestInfo) -> None:
            pass

        def decide(self, result: AttemptResult) -> RetryDecision:
            seen.append((result.attempt, result.queue_s, astuple(result.timing)))
            return RetryDecision(result.attempt < 3, 0.25, "test")

    class Plugin:
        @cometkit.hookimpl
        def cometkit_make_retry_policy(self, ctx: Any) -> Recorder:
            return Recorder()

    clock = FakeClock()
    with Sandbox(always_429=True, retry_after_value_s=0) as sandbox:
        with cometkit.Client(KEY, sandbox.base_url, clock=clock, extra_plugins=[Plugin()],
                             plugins={"limiter": PACED}) as client:
            with pytest.raises(cometkit.RateLimitError):
                client.chat.completions.create(model="m1", messages=MESSAGES)
    # one request a second: after a 0.25 s sleep the next attempt still queues 0.75 s
    assert seen == [(1, 0.0, (0.0, 0.0, 0.0, 1)),
                    (2, 0.75, (0.75, 0.0, 0.25, 2)),
                    (3, 0.75, (1.5, 0.0, 0.5, 3))]


def test_a_requeued_429_waits_in_the_queue_not_in_back_off(tmp_path):
    """The sandbox admits one call a second, states no limit in advance (no rate-limit
    headers) and hints Retry-After on a refusal: the second call is refused while the server
    accepts, so the limiter takes it back into its queue; that wait is queue time of its next
    attempt, and the client never sleeps on its own."""
    clock = FakeClock()
    with Sandbox(rps=1, burst=1, clock=clock, ratelimit_headers="none") as sandbox:
        with cometkit.Client(KEY, sandbox.base_url, clock=clock, rng=FixedRandom(0.5),
                             plugins=metrics_plugins(tmp_path)) as client:
            for _ in range(2):
                client.chat.completions.create(model="m1", messages=MESSAGES)
        refused = sandbox.stats()["attempts_by_status"].get(429, 0)
    attempts, calls = read_csv(tmp_path / "attempts.csv"), read_csv(tmp_path / "calls.csv")
    assert refused >= 1
    retries = [row for row in attempts if row["outcome"] == "retry"]
    assert len(retries) == refused and {row["status_code"] for row in retries} == {"429"}
    assert {row["retry_delay_s"] for row in retries} == {"0"}
    second = calls[1]
    assert int(second["attempts"]) == refused + 1
    assert float(second["backoff_s"]) == 0.0
    assert float(second["queue_s"]) >= 0.5  # held for the hinted second, less what passed
    assert float(second["queue_s"]) == pytest.approx(float(second["duration_s"]), abs=1e-6)
    assert_calls_add_up(attempts, calls, exact=True)


def test_the_retry_policys_sleeps_are_back_off(tmp_path):
    clock = FakeClock()
    plugins = metrics_plugins(tmp_path, backoff={"retry_on": [429, 503], "max_attempts": 3})
    with Sandbox(faults={"503": 1.0}, seed=1) as sandbox:
        with cometkit.Client(KEY, sandbox.base_url, clock=clock, rng=FixedRandom(0.5),
                             plugins=plugins) as client:
            with pytest.raises(cometkit.InternalServerError):
                client.chat.completions.create(model="m1", messages=MESSAGES)
    attempts, calls = read_csv(tmp_path / "attempts.csv"), read_csv(tmp_path / "calls.csv")
    assert [row["outcome"] for row in attempts] == ["retry", "retry", "error"]
    slept = [float(row["retry_delay_s"]) for row in attempts[:2]]
    assert all(delay > 0 for delay in slept)
    (call,) = calls
    assert call["outcome"] == "error"
    assert float(call["backoff_s"]) == pytest.approx(sum(slept), abs=1e-6)
    assert float(call["backoff_s"]) == pytest.approx(sum(clock.sleeps), abs=1e-6)
    assert_calls_add_up(attempts, calls, exact=True)


def test_a_stream_is_on_the_wire_until_its_body_ends(tmp_path):
    """Its attempt is timed at its headers and again at its end: the call counts it once."""
    clock = FakeClock()
    events = [json.dumps({"id": "c", "model": "m1", "choices": [{"delta": {"content": "x"}}]}),
              "[DONE]"]

    def answer(seen):
        clock.advance(0.25)  # the server takes a quarter of a second to answer
        if seen.json().get("stream"):
            return Reply(200, events=events)
        return json_reply(200, chat_body())

    with ScriptedServer(answer) as srv:
        with cometkit.Client(KEY, srv.base_url, clock=clock,
                             plugins={"limiter": PACED, **metrics_plugins(tmp_path)}) as client:
            client.chat.completions.create(model="m1", messages=MESSAGES)  # takes the token
            stream = client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
            clock.advance(2.0)  # the caller reads slowly
            assert "".join(chunk.choices[0].delta.content for chunk in stream) == "x"
    attempts, calls = read_csv(tmp_path / "attempts.csv"), read_csv(tmp_path / "calls.csv")
    streamed = calls[1]
    assert float(attempts[1]["queue_s"]) == pytest.approx(0.75, abs=1e-6)  # 1 s less 0.25
    assert float(streamed["wire_s"]) == pytest.approx(2.25, abs=1e-6)
    assert float(streamed["duration_s"]) == pytest.approx(3.0, abs=1e-6)
    assert_calls_add_up(attempts, calls, exact=True)


def test_the_requests_adapter_records_queue_time(tmp_path):
    clock = FakeClock()
    with Sandbox() as sandbox:
        with cometkit.Client(KEY, sandbox.base_url, clock=clock,
                             plugins={"limiter": PACED, **metrics_plugins(tmp_path)}) as client:
            session = requests.Session()
            session.mount("http://127.0.0.1", CometAdapter(client))
            for _ in range(2):
                answer = session.post(sandbox.base_url + "/chat/completions",
                                      json={"model": "m1", "messages": MESSAGES}, timeout=10)
                assert answer.status_code == 200
    attempts, calls = read_csv(tmp_path / "attempts.csv"), read_csv(tmp_path / "calls.csv")
    assert seconds(attempts, "queue_s") == pytest.approx([0.0, 1.0], abs=1e-6)
    assert_calls_add_up(attempts, calls, exact=True)


def test_a_summary_shows_where_the_time_went(tmp_path, capsys):
    """The stdout summary at close, live, and ``cometkit report`` read back from the CSV,
    agree on queue p50 / p95 and the split."""
    clock = FakeClock()
    plugins = {"limiter": PACED, "stdout_metrics": {"format": "json", "per_attempt": False},
               **metrics_plugins(tmp_path)}
    with Sandbox() as sandbox:
        with cometkit.Client(KEY, sandbox.base_url, clock=clock, plugins=plugins) as client:
            for _ in range(4):
                client.chat.completions.create(model="m1", messages=MESSAGES)
    live = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]["total"]
    assert live["queue_p50_s"] == pytest.approx(1.0, rel=0.01)
    assert live["queue_p95_s"] == pytest.approx(1.0, rel=0.01)
    assert (live["queue_s"], live["wire_s"], live["backoff_s"]) == pytest.approx((3.0, 0, 0))
    assert live["queue_share"] == 1.0
    assert live["latency_max_s"] == pytest.approx(1.0)  # the caller waited the queue too
    done = run_cli("report", tmp_path / "attempts.csv", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"] == live


@pytest.mark.timeout(120)
def test_batch_records_queue_time_behind_a_narrow_limiter(tmp_path):
    """Four threads, one slot, answers that take a quarter of a second: calls queue."""
    source = tmp_path / "in.jsonl"
    write_prompts(source, 8)
    extra = ("plugins:\n  limiter: {max_concurrency: 1}\n"
             f"  csv_metrics: {{calls_path: {tmp_path / 'calls.csv'}}}\n")
    with Sandbox(latency_s=0.25) as sandbox:
        done = run_cli("batch", source, "-o", tmp_path / "out.jsonl", "--concurrency", "4",
                       "--config", config_for(tmp_path, sandbox.base_url, extra),
                       "--metrics-csv", tmp_path / "m.csv", "--no-progress", cwd=tmp_path,
                       env=cli_env(COMETAPI_KEY="sk-x"))
        assert sandbox.stats()["max_in_flight_seen"] == 1
    assert done.returncode == 0, done.stderr
    attempts, calls = read_csv(tmp_path / "m.csv"), read_csv(tmp_path / "calls.csv")
    assert len(calls) == 8 and all(row["queue_s"] != "" for row in attempts)
    assert max(seconds(attempts, "queue_s")) >= 0.1  # someone waited for the busy slot
    assert_calls_add_up(attempts, calls, exact=False)
    report = run_cli("report", tmp_path / "m.csv", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "Queue p95" in report.stdout.splitlines()[0]
    # batch's own summary at close (stdout_metrics, on stderr) carries the same columns
    assert "Queue p95" in done.stderr
