"""The limiter end to end: the real client with its default plugins against the sandbox's rate
limits, with the limit unknown to the client (adaptive mode alone) and known to it
(``requests_per_minute``). Counts come from the sandbox, which saw every attempt."""

from __future__ import annotations

from typing import Any, Optional

import pytest

import cometkit
from cometkit.sandbox import Sandbox

KEY = "sk-test-limiter-e2e"
MESSAGES = [{"role": "user", "content": "hi"}]


def run_calls(sandbox: Sandbox, calls: int, concurrency: int,
              limiter: Optional[dict] = None, models: tuple = ("m1",)) -> list[Any]:
    config = {"plugins": {"limiter": limiter or {}}}
    with cometkit.Client(KEY, sandbox.base_url, concurrency=concurrency,
                         config=config) as client:
        assert "limiter" in client.plugins and "backoff" in client.plugins
        return list(client.map(
            lambda i: client.chat.completions.create(model=models[i % len(models)],
                                                     messages=MESSAGES),
            range(calls), return_exceptions=True))


def refused(sandbox: Sandbox) -> int:
    return sandbox.stats()["attempts_by_status"].get(429, 0)


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("retry_after", ["seconds", "ms"])
def test_adaptive_mode_alone_meets_a_rate_limit_it_does_not_know(retry_after):
    """20 calls/s (burst 20) against 16 threads that could send 320/s."""
    calls = 100
    with Sandbox(rps=20, burst=20, latency_s=0.05, retry_after=retry_after) as sandbox:
        results = run_calls(sandbox, calls, concurrency=16)
        stats = sandbox.stats()
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert refused(sandbox) <= 0.1 * calls, stats["attempts_by_status"]
    assert stats["attempts_by_status"].get(200) == calls


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_adaptive_mode_learns_a_rate_far_below_what_one_connection_sends():
    """A server answering in 10 ms allows 40 calls/s: even one thread would send 100/s, so
    concurrency alone cannot stay under the limit; the learned send rate must."""
    calls = 200
    with Sandbox(rps=40, burst=40, latency_s=0.01) as sandbox:
        results = run_calls(sandbox, calls, concurrency=5)
    assert [r for r in results if isinstance(r, BaseException)] == []
    # Without the learned rate about 10 % are refused; with it about 1 %.
    assert refused(sandbox) <= 0.05 * calls, sandbox.stats()["attempts_by_status"]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_known_requests_per_minute_earns_almost_no_429():
    calls = 100
    with Sandbox(rps=20, burst=20, latency_s=0.05) as sandbox:
        results = run_calls(sandbox, calls, concurrency=16,
                            limiter={"requests_per_minute": 1200})
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert refused(sandbox) <= 0.02 * calls, sandbox.stats()["attempts_by_status"]


@pytest.mark.timeout(60)
def test_the_server_never_sees_more_than_max_concurrency():
    with Sandbox(latency_s=0.05) as sandbox:
        results = run_calls(sandbox, 60, concurrency=8,
                            limiter={"max_concurrency": 3,
                                     "models": {"m2": {"max_concurrency": 1}}},
                            models=("m1", "m2"))
        stats = sandbox.stats()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert stats["max_in_flight_seen"] <= 3
    assert stats["max_in_flight_seen_by_model"]["m2"] == 1
    assert stats["max_in_flight_seen_by_model"]["m1"] >= 2  # the cap is reached, not undercut
