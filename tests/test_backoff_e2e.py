"""The backoff plugin end to end: a real loopback server answering 429 with each kind of hint,
the real client, and an injected clock (so the waits are exact and nothing sleeps)."""

from __future__ import annotations

import email.utils
import logging
import threading

import pytest
from fakes import EPOCH, FakeClock, FixedRandom
from scripted_server import ScriptedServer, chat_body, json_reply

import cometkit
from cometkit import InternalServerError, RateLimitError

NOW = EPOCH + 1000.0


def then_ok(first_replies):
    """Answer the scripted replies in order, then a completion."""
    replies = list(first_replies)
    lock = threading.Lock()

    def handler(seen):
        with lock:
            if replies:
                return replies.pop(0)
        return json_reply(200, chat_body())

    return handler


def too_many(**headers):
    return json_reply(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                      "code": "rate_limit_exceeded"}}, **headers)


def run(handler, *, plugins=None, calls=1):
    clock = FakeClock()
    config = {"plugins": {"limiter": False, **(plugins or {})}}
    with ScriptedServer(handler) as srv:
        with cometkit.Client("k", srv.base_url, config=config, clock=clock,
                             rng=FixedRandom(0.5)) as client:
            results = []
            for _ in range(calls):
                try:
                    results.append(client.chat.completions.create(model="m1", messages=[]))
                except cometkit.APIError as exc:
                    results.append(exc)
        return clock, srv, results, client


HINTS = [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"Retry-After": "3"}, 3.0),
    ({"Retry-After": email.utils.formatdate(NOW + 7, usegmt=True)}, 7.0),
    ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
    ({"x-ratelimit-reset-requests": "250ms"}, 0.25),
]


@pytest.mark.parametrize("headers,hint_s", HINTS, ids=[next(iter(h)) + "=" + next(iter(h.values()))
                                                       for h, _ in HINTS])
def test_each_hint_kind_is_obeyed_with_a_little_jitter(headers, hint_s):
    plugins = {"backoff": {"max_retry_after": 600}}
    clock, srv, results, _ = run(then_ok([too_many(**headers)]), plugins=plugins)
    assert results[0].model == "m1"
    assert srv.count == 2
    (slept,) = clock.sleeps
    # HTTP-dates have one-second resolution, measured against the clock's wall time
    assert hint_s - 1.0 <= slept <= hint_s * 1.1 + 1e-9 if "Retry-After" in headers and \
        not headers["Retry-After"].isdigit() else hint_s <= slept <= hint_s * 1.1 + 1e-9


def test_no_hint_uses_exponential_backoff_with_additive_jitter():
    clock, srv, results, client = run(then_ok([too_many()] * 3))
    assert results[0].model == "m1"
    # 1, 2, 4 s plus uniform(0, 1) jitter at 0.5
    assert clock.sleeps == [1.5, 2.5, 4.5]
    assert client.stats == {"calls": 1, "attempts": 4, "retries": 3, "failures": 0,
                            "sink_errors": 0}


def test_gives_up_after_max_attempts_with_a_rate_limit_error():
    clock, srv, results, _ = run(lambda s: too_many(), plugins={"backoff": {"max_attempts": 3}})
    assert isinstance(results[0], RateLimitError)
    assert srv.count == 3 and len(clock.sleeps) == 2


def test_a_hint_above_max_retry_after_fails_at_once():
    _, srv, results, _ = run(lambda s: too_many(**{"Retry-After": "3600"}))
    err = results[0]
    assert isinstance(err, RateLimitError) and err.retry_after_s == 3600
    assert srv.count == 1


def test_insufficient_quota_is_not_retried():
    reply = json_reply(429, {"error": {"message": "You exceeded your current quota",
                                       "code": "insufficient_quota"}})
    _, srv, results, _ = run(lambda s: reply)
    assert isinstance(results[0], RateLimitError) and results[0].code == "insufficient_quota"
    assert srv.count == 1


def test_server_errors_are_retried_only_when_opted_in():
    fault = json_reply(503, {"error": {"message": "overloaded"}})
    _, srv, results, _ = run(then_ok([fault]))
    assert isinstance(results[0], InternalServerError) and srv.count == 1
    _, srv, results, _ = run(then_ok([fault]), plugins={"backoff": {"retry_on": [429, 503]}})
    assert results[0].model == "m1" and srv.count == 2


def test_every_retry_is_logged_at_info(caplog):
    caplog.set_level(logging.INFO, logger="cometkit")
    run(then_ok([too_many(**{"Retry-After": "2"})]))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retry ")]
    assert len(lines) == 1
    assert lines[0].startswith("retry 2/5 of POST /chat/completions model=m1 after 429 in 2")


def test_storm_of_429s_is_bounded_by_the_retry_budget():
    calls = 100
    _, srv, results, client = run(lambda s: too_many(**{"retry-after-ms": "10"}), calls=calls)
    assert all(isinstance(r, RateLimitError) for r in results)
    ratio, floor = 0.2, 10  # generous bound: ratio of calls plus a handful
    assert srv.count <= calls * (1 + ratio) + floor
    assert any("budget" in str(r) for r in results)
