"""One deadline for the whole call: admission, attempts and retry waits.

The bound (a call with ``deadline=D`` returns within D + 0.25 s) is checked with the real
clock against the real sandbox: a server that never answers, one that answers 429 with a
``Retry-After`` longer than D, and a saturated limiter. The accounting in the error's message
is checked with the injected clock (nothing sleeps) against a real loopback server.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import pytest
import requests
from fakes import FakeClock, FixedRandom
from scripted_server import ScriptedServer, chat_body, json_reply

import cometkit
from cometkit import APITimeoutError, ConfigError, RateLimitError, RetryDecision
from cometkit._client_args import _legacy_deadline_warned
from cometkit.adapters import CometAdapter
from cometkit.sandbox import Sandbox

pytestmark = pytest.mark.timeout(60)

MESSAGES = [{"role": "user", "content": "hi"}]
#: The ceiling the issue sets: a call with ``deadline=D`` ends within D + this.
SLACK_S = 0.25
#: Longer than any deadline here: a server waiting this long "never answers".
NEVER_S = 30.0


def ends_in_time(deadline_s: float, call: Callable[[], Any]) -> tuple[Any, float]:
    """``(the exception raised, seconds taken)``, asserting the call raised within the bound."""
    started = time.monotonic()
    with pytest.raises(APITimeoutError) as info:
        call()
    took = time.monotonic() - started
    assert took <= deadline_s + SLACK_S, f"took {took:.3f} s for a deadline of {deadline_s} s"
    assert info.value.deadline_s == deadline_s
    return info.value, took


def chat(client: cometkit.Client, **kwargs: Any) -> Any:
    return client.chat.completions.create(model="m1", messages=MESSAGES, **kwargs)


def too_many(**headers: str) -> Any:
    return json_reply(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                      "code": "rate_limit_exceeded"}}, **headers)


# -- the bound, with the real clock -----------------------------------------------------------


def test_a_server_that_never_answers_ends_at_the_deadline_not_the_read_timeout():
    with Sandbox(latency_s=NEVER_S) as sandbox:
        with cometkit.Client("k", sandbox.base_url, timeout=NEVER_S) as client:
            error, _ = ends_in_time(1.0, lambda: chat(client, deadline=1.0))
    assert "deadline 1 s: " in str(error) and "it passed during attempt 1" in str(error)
    assert "Read timeout" in str(error)  # the attempt's own error, cut short by the deadline
    assert error.stage == "read"  # sent: the server may have started on it


def test_a_retry_after_longer_than_the_deadline_fails_at_once_and_the_hold_ends_at_it():
    with Sandbox(always_429=True, retry_after_value_s=NEVER_S) as sandbox:
        with cometkit.Client("k", sandbox.base_url, deadline=1.0) as client:
            error, took = ends_in_time(1.0, lambda: chat(client))
            assert took < 0.5  # not made at all: there is no point waiting for the deadline
            assert "the next wait of " in str(error) and "would pass it" in str(error)
            assert isinstance(error.__cause__, RateLimitError)
            assert "Rate limit reached" in str(error)  # the last error is quoted
            # The limiter now holds the model for the Retry-After: the next call waits in it,
            # up to its deadline, and is never sent.
            error, _ = ends_in_time(1.0, lambda: chat(client))
            assert "1.0 s waiting for admission, 0 attempts" in str(error)
            assert "it passed while waiting for admission" in str(error)
            assert error.stage == "connect"  # nothing was sent
        assert sandbox.stats()["attempts"] == 1


def test_behind_a_saturated_limiter_the_call_ends_at_its_deadline_unsent():
    config = {"plugins": {"limiter": {"requests_per_minute": 1, "adaptive": False}}}
    with Sandbox() as sandbox:
        with cometkit.Client("k", sandbox.base_url, config=config) as client:
            assert chat(client, deadline=1.0).choices[0].message.content == "echo: hi"
            error, _ = ends_in_time(1.0, lambda: chat(client, deadline=1.0))
            assert "waiting for admission, 0 attempts" in str(error)
            assert isinstance(error.__cause__, RateLimitError)  # the limiter's own refusal
        assert sandbox.stats()["attempts"] == 1


def test_a_call_requeued_by_429s_while_the_server_accepts_ends_at_its_deadline():
    first = []

    def handler(seen: Any) -> Any:
        if not first:
            first.append(seen)
            return json_reply(200, chat_body())
        return too_many(**{"retry-after-ms": "200"})

    with ScriptedServer(handler) as server:
        with cometkit.Client("k", server.base_url, deadline=1.5) as client:
            chat(client)  # the server accepts: later 429s mean "not now"
            error, _ = ends_in_time(1.5, lambda: chat(client))
            assert client.stats["retries"] >= 2  # requeued, not given up at the first 429
    assert server.count >= 3
    assert "Rate limit reached" in str(error)  # the last 429, quoted


def test_a_stream_is_bounded_up_to_its_first_bytes():
    with Sandbox(latency_s=NEVER_S) as sandbox:
        with cometkit.Client("k", sandbox.base_url) as client:
            error, _ = ends_in_time(1.0, lambda: chat(client, stream=True, deadline=1.0))
    assert "it passed during attempt 1" in str(error)
    with Sandbox() as sandbox:
        with cometkit.Client("k", sandbox.base_url, deadline=5) as client:
            chunks = list(chat(client, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hi"


def test_a_call_within_its_deadline_is_not_disturbed():
    replies = [too_many(**{"retry-after-ms": "100"})]

    def handler(seen: Any) -> Any:
        return replies.pop() if replies else json_reply(200, chat_body("fine"))

    with ScriptedServer(handler) as server:
        with cometkit.Client("k", server.base_url, deadline=5) as client:
            assert chat(client).choices[0].message.content == "fine"
    assert server.count == 2


# -- through the requests adapter and the batch command ---------------------------------------


def test_the_requests_adapter_cuts_the_callers_timeout_to_the_deadline():
    with Sandbox(latency_s=NEVER_S) as sandbox:
        with CometAdapter(config={"deadline": 1.0, "base_url": sandbox.base_url}) as adapter:
            session = requests.Session()
            session.mount(sandbox.base_url, adapter)
            error, _ = ends_in_time(1.0, lambda: session.post(
                sandbox.base_url + "/chat/completions", timeout=NEVER_S,
                json={"model": "m1", "messages": MESSAGES}))
    assert "it passed during attempt 1" in str(error)


def test_the_requests_adapter_raises_instead_of_returning_the_429_at_the_deadline():
    with Sandbox(always_429=True, retry_after_value_s=NEVER_S) as sandbox:
        with CometAdapter(config={"deadline": 1.0, "base_url": sandbox.base_url}) as adapter:
            session = requests.Session()
            session.mount(sandbox.base_url, adapter)
            error, _ = ends_in_time(1.0, lambda: session.post(
                sandbox.base_url + "/chat/completions",
                json={"model": "m1", "messages": MESSAGES}))
    assert "would pass it" in str(error)


def test_batch_deadline_bounds_every_line(tmp_path):
    from test_cli_batch import cli_env, read_output, run_cli, write_prompts

    ids = write_prompts(tmp_path / "in.jsonl", 3)
    with Sandbox(latency_s=NEVER_S) as sandbox:
        (tmp_path / "c.yaml").write_text(f"base_url: {sandbox.base_url}\napi_key: sk-x\n")
        started = time.monotonic()
        done = run_cli("batch", "in.jsonl", "-o", "out.jsonl", "--config", "c.yaml",
                       "--deadline", "1s", "--concurrency", "3", "--no-progress",
                       cwd=tmp_path, env=cli_env())
        took = time.monotonic() - started
    assert done.returncode == 1, done.stderr  # some requests failed
    assert took < NEVER_S / 2  # the lines ended at their deadline, not the server's
    records = read_output(tmp_path / "out.jsonl")
    assert sorted(r["custom_id"] for r in records) == ids
    for record in records:
        assert record["error"]["code"] == "timeout"
        assert record["error"]["message"].startswith("deadline 1 s: ")


def test_batch_refuses_a_deadline_that_is_not_a_duration(tmp_path):
    from test_cli_batch import cli_env, run_cli, write_prompts

    write_prompts(tmp_path / "in.jsonl", 1)
    done = run_cli("batch", "in.jsonl", "-o", "out.jsonl", "--sandbox", "--deadline", "soon",
                   cwd=tmp_path, env=cli_env())
    assert done.returncode == 2
    assert "--deadline" in done.stderr and "soon" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()


# -- where the time went, with the injected clock ---------------------------------------------


def test_the_message_adds_up_attempts_and_back_off():
    clock = FakeClock()
    with ScriptedServer(lambda seen: too_many(**{"Retry-After": "3"})) as server:
        with cometkit.Client("k", server.base_url, config={"plugins": {"limiter": False}},
                             clock=clock, rng=FixedRandom(0.5)) as client:
            with pytest.raises(APITimeoutError) as info:
                chat(client, deadline=8)
    # 3 s + 5 % jitter twice (t = 6.3); the third wait would end at 9.45 > 8: not made
    assert clock.sleeps == pytest.approx([3.15, 3.15])
    assert server.count == 3
    text = str(info.value)
    assert text.startswith("deadline 8 s: 0.0 s waiting for admission, 3 attempts (0.0 s), "
                           "6.3 s in back-off; the next wait of ")
    assert "(1.7 s left); last error: " in text
    assert info.value.deadline_s == 8 and isinstance(info.value.__cause__, RateLimitError)


class AlwaysRetry:
    """A third-party retry policy that knows nothing of deadlines."""

    __name__ = "always_retry"

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    @cometkit.hookimpl
    def cometkit_make_retry_policy(self, ctx: Any) -> AlwaysRetry:
        return self

    def on_call_start(self, request: Any) -> None:
        pass

    def decide(self, result: Any) -> RetryDecision:
        return RetryDecision(True, self.delay_s, "always")


@pytest.mark.parametrize("delay_s, sleeps", [(10.0, []), (1.0, [1.0, 1.0, 1.0, 1.0])])
def test_the_core_refuses_a_retry_past_the_deadline_whatever_the_policy_says(delay_s, sleeps):
    clock = FakeClock()
    with ScriptedServer(lambda seen: too_many()) as server:
        with cometkit.Client("k", server.base_url, config={"plugins": {"limiter": False}},
                             clock=clock, extra_plugins=[AlwaysRetry(delay_s)]) as client:
            assert "always_retry" in client.plugins
            with pytest.raises(APITimeoutError) as info:
                chat(client, deadline=5)
    assert clock.sleeps == sleeps  # never a sleep that ends at or past the deadline
    assert server.count == len(sleeps) + 1
    assert f"the next wait of {delay_s:.1f} s would pass it" in str(info.value)


def test_the_message_counts_the_wait_for_admission():
    clock = FakeClock()
    config = {"deadline": 5,
              "plugins": {"limiter": {"requests_per_minute": 1, "adaptive": False}}}
    with ScriptedServer() as server:
        with cometkit.Client("k", server.base_url, config=config, clock=clock) as client:
            chat(client)
            with pytest.raises(APITimeoutError) as info:
                chat(client)
    assert clock.sleeps == [5.0]  # the limiter waited exactly what was left, no more
    assert str(info.value) == ("deadline 5 s: 5.0 s waiting for admission, 0 attempts "
                               "(0.0 s), 0.0 s in back-off; it passed while waiting for "
                               "admission")
    assert server.count == 1


def test_the_limiters_own_acquire_timeout_still_applies_when_shorter():
    clock = FakeClock()
    config = {"deadline": 5, "plugins": {"limiter": {"requests_per_minute": 1,
                                                     "adaptive": False,
                                                     "acquire_timeout": 2}}}
    with ScriptedServer() as server:
        with cometkit.Client("k", server.base_url, config=config, clock=clock) as client:
            chat(client)
            with pytest.raises(RateLimitError, match="acquire_timeout=2 s"):
                chat(client)
    assert clock.sleeps == [2.0]


def test_the_calls_deadline_wins_over_the_clients_and_none_keeps_the_clients():
    clock = FakeClock()
    with ScriptedServer(lambda seen: too_many(**{"Retry-After": "3"})) as server:
        with cometkit.Client("k", server.base_url, deadline="1m",
                             config={"plugins": {"limiter": False}}, clock=clock,
                             rng=FixedRandom(0.0)) as client:
            assert client.deadline_s == 60.0
            with pytest.raises(APITimeoutError, match="^deadline 4 s: "):
                chat(client, deadline=4)
            assert clock.sleeps == [3.0]
            with pytest.raises(RateLimitError, match="max_attempts"):
                chat(client, deadline=None)  # 60 s: the attempts run out first


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-1, ValueError), ("soon", ValueError), (float("nan"), ValueError),
    (True, TypeError), ([5], TypeError)])
def test_a_bad_call_deadline_is_refused_before_anything_is_sent(value, error):
    with ScriptedServer() as server:
        with cometkit.Client("k", server.base_url) as client:
            with pytest.raises(error, match="deadline"):
                chat(client, deadline=value)
            with pytest.raises(error, match="deadline"):
                client.request("GET", "/models", deadline=value)
    assert server.count == 0


def test_a_bad_configured_deadline_names_the_key():
    with pytest.raises(ConfigError) as info:
        cometkit.Client("k", "http://127.0.0.1:9/v1", config={"deadline": "soon"})
    assert info.value.key == "deadline" and "20s" in str(info.value)


def test_the_deprecated_backoff_deadline_becomes_the_call_deadline_with_one_warning(caplog):
    _legacy_deadline_warned.clear()
    old = {"plugins": {"backoff": {"deadline": 7}}}
    with caplog.at_level(logging.WARNING, logger="cometkit"):
        with cometkit.Client("k", "http://127.0.0.1:9/v1", config=old) as client:
            assert client.deadline_s == 7.0
        with cometkit.Client("k", "http://127.0.0.1:9/v1", config=old) as again:
            assert again.deadline_s == 7.0
        with cometkit.Client("k", "http://127.0.0.1:9/v1", config={**old, "deadline": 3}) as both:
            assert both.deadline_s == 3.0  # the top-level key wins
    warnings = [r for r in caplog.records if "plugins.backoff.deadline is deprecated" in
                r.getMessage()]
    assert len(warnings) == 1
    assert "deadline: 7 at the top level" in warnings[0].getMessage()


def test_the_deprecated_key_still_ends_a_call_end_to_end():
    _legacy_deadline_warned.set()  # warned about above; not under test here
    clock = FakeClock()
    config = {"plugins": {"limiter": False, "backoff": {"deadline": 4}}}
    with ScriptedServer(lambda seen: too_many(**{"Retry-After": "3"})) as server:
        with cometkit.Client("k", server.base_url, config=config, clock=clock,
                             rng=FixedRandom(0.0)) as client:
            with pytest.raises(APITimeoutError, match="^deadline 4 s: "):
                chat(client)
    assert server.count == 2


class Recorder:
    """A metrics sink keeping every record (a plugin object, registered directly)."""

    __name__ = "recorder"

    def __init__(self) -> None:
        self.attempts: list = []
        self.calls: list = []

    @cometkit.hookimpl
    def cometkit_make_metrics_sink(self, ctx: Any) -> Recorder:
        return self

    def record_attempt(self, record: Any) -> None:
        self.attempts.append(record)

    def record_call(self, record: Any) -> None:
        self.calls.append(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_metrics_record_each_attempt_as_it_ended_and_the_call_as_a_timeout():
    clock = FakeClock()
    sink = Recorder()
    with ScriptedServer(lambda seen: too_many(**{"Retry-After": "30"})) as server:
        with cometkit.Client("k", server.base_url, config={"plugins": {"limiter": False}},
                             clock=clock, extra_plugins=[sink]) as client:
            with pytest.raises(APITimeoutError):
                chat(client, deadline=10)
            assert client.stats["failures"] == 1 and client.stats["retries"] == 0
    assert [(a.error_type, a.outcome) for a in sink.attempts] == [("RateLimitError", "error")]
    assert [(c.error_type, c.outcome, c.attempts) for c in sink.calls] == [
        ("APITimeoutError", "error", 1)]


def test_a_call_that_never_got_admitted_is_recorded_with_no_attempt():
    clock = FakeClock()
    sink = Recorder()
    config = {"plugins": {"limiter": {"requests_per_minute": 1, "adaptive": False}}}
    with ScriptedServer() as server:
        with cometkit.Client("k", server.base_url, config=config, clock=clock,
                             extra_plugins=[sink]) as client:
            chat(client)
            with pytest.raises(APITimeoutError):
                chat(client, deadline=1)
    assert [(c.error_type, c.outcome, c.attempts) for c in sink.calls] == [
        (None, "ok", 1), ("APITimeoutError", "error", 0)]
    assert len(sink.attempts) == 1
