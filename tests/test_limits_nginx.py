"""cometkit behind a real third-party limiter: nginx ``limit_req`` (20 r/s, burst 5, 429
without Retry-After) in front of the sandbox.

Three views of every run must agree: the client's ``stats``, nginx's access log (every
attempt, 200 or 429) and the sandbox (only what nginx let through). No timing is asserted.
"""

from __future__ import annotations

import http.client
import json
from typing import Any, Iterator, Optional

import pytest
from nginx_server import NGINX, NginxLimiter

import cometkit
from cometkit.sandbox import Sandbox
from cometkit_plugins.limiter import AdmissionLimiter

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs "
                                             "Debian's nginx; apt-get install nginx)"),
]

KEY = "sk-test-nginx-limit-req-4e1d"
RATE = "20r/s"
BURST = 5
THREADS = 16
CALLS = 100


@pytest.fixture
def limited() -> Iterator[tuple]:
    """A fresh sandbox (50 ms answers) behind a fresh nginx: an empty leaky bucket."""
    with Sandbox(latency_s=0.05) as sandbox, \
            NginxLimiter(sandbox.base_url, rate=RATE, burst=BURST) as nginx:
        yield sandbox, nginx


def run_calls(base_url: str, calls: int, limiter: Optional[dict] = None) -> tuple:
    """``calls`` chat completions through ``client.map`` on 16 threads: (results, stats)."""
    config = {"plugins": {"limiter": limiter or {}}}
    with cometkit.Client(KEY, base_url, concurrency=THREADS, config=config) as client:
        results = list(client.map(
            lambda i: client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"call {i}"}]),
            range(calls), return_exceptions=True))
        return results, client.stats


def answered(results: list) -> int:
    return sum(1 for i, result in enumerate(results)
               if not isinstance(result, BaseException)
               and result.choices[0].message.content == f"echo: call {i}")


def test_nginx_refuses_beyond_its_burst_with_429_and_no_retry_after():
    """What the client is up against: rate + burst answered, then a bare 429."""
    with Sandbox() as sandbox, NginxLimiter(sandbox.base_url, rate=RATE, burst=BURST) as nginx:
        seen = _send_back_to_back(nginx.port, BURST + 4)  # far faster than 20/s
        assert seen[0] == (200, None)
        assert (429, None) in seen
        refused = sum(1 for status, _ in seen if status == 429)
        assert nginx.statuses(at_least=len(seen)) == {200: len(seen) - refused, 429: refused}
        assert sandbox.stats()["attempts"] == len(seen) - refused
        assert KEY not in nginx.error_log()


def test_keyed_by_authorization_each_api_key_has_its_own_bucket():
    with Sandbox() as sandbox, NginxLimiter(sandbox.base_url, rate=RATE, burst=BURST,
                                            key="authorization") as nginx:
        first = _send_back_to_back(nginx.port, BURST + 4, key="sk-first")
        second = _send_back_to_back(nginx.port, BURST + 4, key="sk-second")
    for seen in (first, second):  # the second key's bucket is full although the first's is not
        assert seen[0] == (200, None) and (429, None) in seen


def _send_back_to_back(port: int, requests: int, key: str = KEY) -> list:
    """(status, Retry-After) of ``requests`` chat completions sent one after the other."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen: list[Any] = []
    try:
        for _ in range(requests):
            connection.request("POST", "/v1/chat/completions", headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                body=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
            response = connection.getresponse()
            response.read()
            seen.append((response.status, response.getheader("Retry-After")))
    finally:
        connection.close()
    return seen


@pytest.mark.slow
def test_defaults_answer_every_call_through_nginx_limit_req(limited):
    sandbox, nginx = limited
    results, stats = run_calls(nginx.base_url, CALLS)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert answered(results) == CALLS
    # The sandbox saw each call exactly once: nginx refused every other attempt.
    assert sandbox.stats()["attempts_by_status"] == {200: CALLS}
    at_nginx = nginx.statuses(at_least=stats["attempts"])
    assert at_nginx[200] == CALLS
    assert sum(at_nginx.values()) == stats["attempts"]
    assert at_nginx[429] == stats["attempts"] - CALLS
    assert stats["calls"] == CALLS and stats["failures"] == 0


@pytest.mark.slow
def test_defaults_learn_an_unworded_cap_on_calls_in_flight_from_nginx_limit_conn():
    """nginx ``limit_conn 4`` answers a bare 429 (no wording, no Retry-After) above four
    requests in flight: the limiter tells that cap from a rate by the levels it refuses at,
    keeps below it, and every call is answered."""
    calls, cap = 200, 4
    with Sandbox(latency_s=0.1) as sandbox, \
            NginxLimiter(sandbox.base_url, rate=None, connections=cap) as nginx:
        limiter = AdmissionLimiter(max_concurrency=THREADS)  # the defaults, kept at hand

        class Plugin:
            @cometkit.hookimpl(tryfirst=True)
            def cometkit_make_limiter(self, ctx: Any) -> AdmissionLimiter:
                return limiter

        with cometkit.Client(KEY, nginx.base_url, concurrency=THREADS,
                             extra_plugins=[Plugin()]) as client:
            results = list(client.map(
                lambda i: client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"call {i}"}]),
                range(calls), return_exceptions=True))
            lane = limiter.stats()["models"]["gpt-4o-mini"]
            stats = client.stats
        at_nginx = nginx.statuses(at_least=stats["attempts"])
        seen = sandbox.stats()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert answered(results) == calls
    assert seen["max_in_flight_seen"] <= cap
    assert lane["ceiling"] in (cap, cap + 1)  # the refused level less one (or one probe up)
    assert lane["rate_per_s"] is None  # what the refusals seemed to teach about a rate: undone
    assert at_nginx[200] == calls and at_nginx[429] == stats["attempts"] - calls
    assert at_nginx[429] <= 0.05 * calls, at_nginx  # a few refusals, then none


@pytest.mark.slow
def test_told_the_limit_answers_every_call_with_few_429s(limited):
    sandbox, nginx = limited
    # 20 r/s, and a burst of 0.25 s of it: nginx's 5 saved-up requests.
    results, stats = run_calls(nginx.base_url, CALLS,
                               limiter={"requests_per_minute": 1200, "burst": 0.25})
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert answered(results) == CALLS
    assert sandbox.stats()["attempts_by_status"] == {200: CALLS}
    at_nginx = nginx.statuses(at_least=stats["attempts"])
    assert at_nginx[200] == CALLS and sum(at_nginx.values()) == stats["attempts"]
    assert at_nginx[429] < 0.1 * CALLS, at_nginx


@pytest.mark.slow
def test_streams_pass_through_nginx_unbuffered_and_whole(limited):
    sandbox, nginx = limited
    calls = 30
    prompt = "stream " + "many words " * 40  # long enough for several content chunks

    def stream(i: int) -> tuple:
        with client.chat.completions.create(
                model="gpt-4o-mini", stream=True,
                messages=[{"role": "user", "content": f"{i} {prompt}"}]) as chunks:
            pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
        return len(pieces), "".join(pieces)

    with cometkit.Client(KEY, nginx.base_url, concurrency=THREADS) as client:
        results = list(client.map(stream, range(calls), return_exceptions=True))
        stats = client.stats
    assert [r for r in results if isinstance(r, BaseException)] == []
    for i, (pieces, text) in enumerate(results):
        assert text == f"echo: {i} {prompt}"
        assert pieces > 2
    assert sandbox.stats()["attempts_by_status"] == {200: calls}
    at_nginx = nginx.statuses(at_least=stats["attempts"])
    assert at_nginx[200] == calls and at_nginx[429] == stats["attempts"] - calls


@pytest.mark.parametrize(("upstream", "options", "message"), [
    ("127.0.0.1:8080", {}, "upstream_url must be http://HOST:PORT"),
    ("https://127.0.0.1:8080/v1", {}, "upstream_url must be http://HOST:PORT"),
    ("http://127.0.0.1:8080/v1", {"key": "ip"}, "key must be one of constant, authorization"),
    ("http://127.0.0.1:8080/v1", {"burst": -1}, "burst must be >= 0"),
])
def test_bad_options_are_refused_before_anything_starts(upstream, options, message):
    with pytest.raises(ValueError, match=message):
        NginxLimiter(upstream, **options)
