"""Limits as real servers enforce them: a 429 from a server that still accepts never fails a
call, and the limiter learns windows, concurrency caps, stated limits and the server's
tokenizer.

Unit tests drive the limiter and its adaptive control on a fake clock (the wall clock of
``FakeClock`` is on a minute boundary at ``monotonic() == 1000``); end-to-end tests run the
real client against the sandbox on loopback.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Optional

import pytest
from fakes import FakeClock, FixedRandom
from requests.structures import CaseInsensitiveDict

import cometkit
from cometkit import AttemptResult, RateLimitError, RequestInfo, RetryDecision, Throttle
from cometkit.hints import parse_hints, refusal_kind
from cometkit.sandbox import Sandbox
from cometkit_plugins.backoff import BackoffPolicy
from cometkit_plugins.limiter import AdmissionLimiter
from cometkit_plugins.limiting.adaptive import (
    CAP_EVIDENCE,
    DEFAULT_HOLD_S,
    MINUTE_AFTER_PROBES,
    MINUTE_SLACK_S,
    WINDOW_SLACK_S,
    AdaptiveControl,
)

NOW = 1_700_000_000.0


def request(model: Optional[str] = "m", n: int = 1, body: Any = None,
            started_at: float = 0.0) -> RequestInfo:
    return RequestInfo(f"ck-{n}", "chat", "POST", "/chat/completions", model, json=body,
                       started_at=started_at)


def wait_for(condition: Any, timeout_s: float = 10.0) -> bool:
    """Poll ``condition`` (bounded) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def answer(status: int = 200, *, started_at: float = 0.0, headers: Optional[dict] = None,
           message: Optional[str] = None, clock: Optional[FakeClock] = None,
           **fields: Any) -> AttemptResult:
    headers = CaseInsensitiveDict(headers or {})
    wall = clock.time() if clock is not None else NOW
    result = AttemptResult(request(), 1, status_code=status, headers=headers,
                           started_at=started_at, duration_s=0.05, **fields)
    result.hints = parse_hints(headers, wall, message if status == 429 else None)
    return result


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- hints, parsed once --------------------------------------------------------------------


def test_every_header_family_is_read_and_the_tightest_descriptor_wins():
    openai = parse_hints(CaseInsensitiveDict({
        "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "12",
        "x-ratelimit-reset-requests": "1.5s", "x-ratelimit-limit-tokens": "40000",
        "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "250ms"}), NOW)
    assert (openai.limit_requests, openai.remaining_requests, openai.reset_requests_s) == (
        500, 12, 1.5)
    assert (openai.limit_tokens, openai.remaining_tokens, openai.reset_tokens_s) == (
        40000, 900, 0.25)
    assert openai.wait_s == 1.5  # no Retry-After: the longer reset

    litellm = parse_hints(CaseInsensitiveDict({
        "x-ratelimit-api_key-limit-requests": "10", "x-ratelimit-api_key-remaining-requests": "3",
        "x-ratelimit-model_per_key-remaining-requests": "1",
        "x-ratelimit-model_per_key-limit-requests": "5",
        "x-ratelimit-api_key-remaining-tokens": "77"}), NOW)
    assert (litellm.remaining_requests, litellm.limit_requests) == (1, 5)
    assert litellm.remaining_tokens == 77 and litellm.reset_requests_s is None

    anthropic = parse_hints(CaseInsensitiveDict({
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:30Z",  # NOW + 10 s
        "anthropic-ratelimit-tokens-remaining": "1000",
        "anthropic-ratelimit-tokens-limit": "20000",
        "retry-after": "7"}), NOW)
    assert (anthropic.remaining_requests, anthropic.limit_requests) == (0, 50)
    assert anthropic.reset_requests_s == pytest.approx(10.0)
    assert anthropic.retry_after_s == 7.0 and anthropic.wait_s == 7.0


@pytest.mark.parametrize("message, kind", [
    ("Too many concurrent requests for model m.", "concurrency"),
    ("Max parallel request limit reached. rate_limit_type: max_parallel_requests",
     "concurrency"),
    ("Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000", "tokens"),
    ("Rate limit reached for gpt-4o on requests per min (RPM)", None),
    ("You exceeded your current quota. insufficient_quota", "quota"),
    ("insufficient_quota: upstream saturated, please try again later", None),
    ("", None),
])
def test_the_wording_of_a_429_says_which_limit_refused(message, kind):
    assert refusal_kind(message) == kind


def test_an_empty_token_bucket_in_the_headers_marks_a_token_refusal():
    hints = parse_hints(CaseInsensitiveDict({"x-ratelimit-remaining-tokens": "0",
                                             "x-ratelimit-remaining-requests": "40"}), NOW,
                        "Rate limit exceeded")
    assert hints.refusal == "tokens"


def test_malformed_headers_read_as_no_hint():
    hints = parse_hints(CaseInsensitiveDict({
        "x-ratelimit-remaining-requests": "-3", "x-ratelimit-limit-requests": "lots",
        "anthropic-ratelimit-requests-reset": "yesterday", "retry-after": "inf"}), NOW)
    assert hints.remaining_requests is None and hints.limit_requests is None
    assert hints.reset_requests_s is None and hints.wait_s is None


# -- the retry policy: requeue while the server accepts ------------------------------------


def refused(clock: FakeClock, throttle: Optional[Throttle], history: tuple = (), *,
            code: Optional[str] = None, message: str = "slow down",
            headers: Optional[dict] = None) -> AttemptResult:
    body = {"error": {"message": message, "code": code}}
    error = RateLimitError(f"Error code: 429 - {message}", status_code=429, body=body,
                           code=code)
    attempt = len(history) + 1
    result = AttemptResult(request(started_at=clock.monotonic()), attempt, status_code=429,
                           headers=CaseInsensitiveDict(headers or {}), error=error,
                           error_code=code, history=history, throttle=throttle)
    result.hints = parse_hints(result.headers, clock.time(), message)
    return result


def test_a_429_while_the_server_accepts_is_requeued_without_spending_an_attempt(clock):
    policy = BackoffPolicy(max_attempts=2, budget_floor=0, budget_ratio=0, clock=clock,
                           rng=FixedRandom(0.0))
    accepting = Throttle(True, "rate", 0.5)
    history: tuple = ()
    for _ in range(20):  # far more than max_attempts, and a budget of zero
        decision = policy.decide(refused(clock, accepting, history))
        assert decision.retry and decision.requeue and decision.delay_s == 0.5
        history += (decision,)
    # A storm (nobody accepted lately): the ordinary rules apply, and the requeues were free.
    storm = policy.decide(refused(clock, Throttle(False), history))
    assert not storm.retry and "budget" in str(storm.error)
    policy = BackoffPolicy(max_attempts=2, budget_floor=10, clock=clock, rng=FixedRandom(0.0))
    first = policy.decide(refused(clock, Throttle(False), history))
    assert first.retry and not first.requeue
    second = policy.decide(refused(clock, Throttle(False), history + (first,)))
    assert not second.retry and "max_attempts=2" in str(second.error)


def test_requeues_still_end_at_the_deadline_and_at_max_retry_after(clock):
    policy = BackoffPolicy(deadline=10, max_retry_after=30, clock=clock)
    result = refused(clock, Throttle(True, "window", 4.0))
    clock.advance(7.0)  # 7 s spent + 4 s of expected wait > 10
    decision = policy.decide(result)
    assert not decision.retry and "deadline of 10 s" in str(decision.error)
    long_hint = refused(clock, Throttle(True), headers={"Retry-After": "60"})
    decision = BackoffPolicy(max_retry_after=30, clock=clock).decide(long_hint)
    assert not decision.retry and "over max_retry_after=30 s" in str(decision.error)


def test_a_quota_429_fails_at_once_unless_its_message_says_to_try_later(clock):
    policy = BackoffPolicy(clock=clock)
    spent = policy.decide(refused(clock, Throttle(True), code="insufficient_quota",
                                  message="You exceeded your current quota"))
    assert not spent.retry and "insufficient_quota" in spent.reason
    overloaded = policy.decide(refused(
        clock, Throttle(True), code="insufficient_quota",
        message="当前分组上游负载已饱和，请稍后再试 (upstream saturated, try again later)"))
    assert overloaded.retry and overloaded.requeue
    lenient = BackoffPolicy(give_up_codes=[], clock=clock)
    assert lenient.decide(refused(clock, Throttle(True), code="insufficient_quota")).retry
    strict = BackoffPolicy(wait_despite=[], clock=clock)
    assert not strict.decide(refused(clock, Throttle(True), code="insufficient_quota",
                                     message="saturated, try again later")).retry


# -- adaptive control: holds, probes, windows, caps ------------------------------------------


def serve(control: AdaptiveControl, clock: FakeClock, status: int = 200, *,
          headers: Optional[dict] = None, message: Optional[str] = None,
          in_flight: Optional[int] = None, latency: float = 0.01) -> tuple[float, str]:
    """Admit one attempt when the control allows it (jumping the fake clock there), answer
    it after ``latency``; returns (admitted at, what on_result said)."""
    ready = control.ready_at(clock.monotonic())
    assert ready != math.inf  # a probe still out would never be answered here
    if ready > clock.monotonic():
        clock.advance(ready - clock.monotonic())
    sent = clock.monotonic()
    probe = control.on_admit(sent)
    clock.advance(latency)
    kind = control.on_result(answer(status, started_at=sent, headers=headers, message=message,
                                    clock=clock), clock.monotonic(), clock.time, probe=probe,
                             in_flight=in_flight)
    return sent, kind


def test_hintless_holds_grow_while_probes_are_refused_then_wait_for_the_minute(clock):
    control = AdaptiveControl(16, clock.monotonic())
    clock.advance(20.0)  # 20 s into a wall-clock minute
    serve(control, clock)
    _, kind = serve(control, clock, 429)
    assert kind == "rate"
    holds = []
    for _ in range(12):
        start = clock.monotonic()
        sent, _ = serve(control, clock, 429)
        holds.append(round(sent - start, 2))
        if (clock.time() % 60) < 1.0:
            break
    # 0.25 s, then 2 s, then the turn of the minute, one probe per hold: a closed calendar
    # minute costs its first refusal and two probes before the probe at the turn.
    assert holds[:2] == pytest.approx([DEFAULT_HOLD_S, DEFAULT_HOLD_S * 8], abs=0.02)
    assert len(holds) == 1 + MINUTE_AFTER_PROBES
    assert clock.time() % 60 == pytest.approx(MINUTE_SLACK_S + 0.01, abs=0.02)


def test_acceptance_at_the_turn_of_the_minute_is_learned_as_a_calendar_window(clock):
    control = AdaptiveControl(16, clock.monotonic())
    clock.advance(30.0)
    for _ in range(5):  # five accepted, then the minute's quota is spent
        serve(control, clock)
    serve(control, clock, 429)
    # Probes are refused until the minute turns (bounded: at most a dozen holds).
    for _ in range(12):
        if (clock.epoch + control.ready_at(clock.monotonic())) % 60 < 1.0:
            break
        serve(control, clock, 429)
    serve(control, clock)  # the probe at the turn of the minute: accepted
    assert control.window_s == 60.0 and control.window_aligned
    assert control.window_quota == 5
    # The next minute's quota goes out together, then nothing until the minute turns.
    sent = [serve(control, clock)[0] for _ in range(4)]
    assert sent[-1] - sent[0] < 0.1
    nxt, _ = serve(control, clock)
    assert (clock.epoch + nxt) % 60 == pytest.approx(WINDOW_SLACK_S, abs=0.01)


def test_the_same_retry_after_on_refusals_apart_is_a_window_from_its_first_request(clock):
    """LiteLLM's proxy: 10 calls per 10 s window opened by the first request, and every 429
    says ``retry-after: 10`` (the window's length, not the time left)."""
    control = AdaptiveControl(16, clock.monotonic())
    start = clock.monotonic()
    for _ in range(10):
        serve(control, clock, latency=0.4)  # the window's quota, spread over 4 s
    serve(control, clock, 429, headers={"Retry-After": "10"})
    # A long hint ending a run of acceptances is taken for the window's length at once: the
    # hold ends 10 s after the run's first request, not 10 s after the refusal.
    assert control.window_s == 10.0
    assert control.hold_until == pytest.approx(start + 10 + WINDOW_SLACK_S)
    reopened, _ = serve(control, clock, latency=0.4)  # the next window
    for _ in range(9):
        serve(control, clock, latency=0.4)
    # The window's quota (10) is known now: the eleventh call is not sent into the closed
    # window to earn a 429, it waits for the next window.
    assert control.window_quota == 10
    nxt, kind = serve(control, clock, latency=0.4)
    assert nxt == pytest.approx(reopened + 10 + WINDOW_SLACK_S) and kind is None
    # A refusal repeating the same hint keeps the window.
    serve(control, clock, 429, headers={"Retry-After": "10"})
    assert control.window_s == 10.0 and start < reopened


def test_a_cap_on_calls_in_flight_cuts_concurrency_to_below_the_refused_level_without_hold(
        clock):
    control = AdaptiveControl(16, clock.monotonic())
    for _ in range(20):
        serve(control, clock)
    assert control.allowed() == 16
    _, kind = serve(control, clock, 429, headers={"Retry-After": "10"},
                    message="Max parallel request limit reached. rate_limit_type: "
                            "max_parallel_requests", in_flight=5)
    assert kind == "concurrency"
    assert control.allowed() == 4 and control.ceiling == 4
    assert control.hold_until < clock.monotonic()  # the inflated Retry-After is ignored
    for _ in range(30):  # successes do not grow past the remembered ceiling
        serve(control, clock)
    assert control.allowed() == 4


def test_an_unworded_cap_on_calls_in_flight_is_told_by_the_levels_it_refuses(clock):
    """nginx ``limit_conn`` answers a bare 429: refusals only ever above the most calls in
    flight that were accepted, signal after signal, are a cap; the next one sets the ceiling
    and holds nothing."""
    control = AdaptiveControl(16, clock.monotonic())
    for level in (1, 2, 3, 4, 4, 4, 3, 4):
        serve(control, clock, in_flight=level)
    kinds = [serve(control, clock, 429, in_flight=5)[1] for _ in range(CAP_EVIDENCE)]
    assert kinds[:-1] == ["rate"] * (CAP_EVIDENCE - 1) and kinds[-1] == "concurrency"
    assert control.ceiling == 4 and control.allowed() <= 4
    held_until = control.hold_until
    assert serve(control, clock, 429, in_flight=5)[1] == "concurrency"  # known: no more holds
    assert control.hold_until == held_until


def test_a_rate_limit_refusing_at_levels_it_accepts_is_never_taken_for_a_cap(clock):
    control = AdaptiveControl(16, clock.monotonic())
    for level in (1, 2, 3, 4):
        serve(control, clock, in_flight=level)
    for _ in range(3 * CAP_EVIDENCE):
        assert serve(control, clock, 429, in_flight=5)[1] == "rate"  # above, once
        assert serve(control, clock, 429, in_flight=2)[1] == "rate"  # ... and where it accepts
        serve(control, clock, in_flight=1)
    assert control.ceiling is None


def test_the_server_counts_as_accepting_only_within_the_storm_horizon(clock):
    control = AdaptiveControl(4, clock.monotonic())
    assert not control.accepting(clock.monotonic())  # never accepted anything
    serve(control, clock)
    assert control.accepting(clock.monotonic())
    clock.advance(120.0)
    assert not control.accepting(clock.monotonic())


# -- the limiter: verdicts, configured rates, stated limits ----------------------------------


def run_attempt(lim: AdmissionLimiter, clock: FakeClock, status: int = 200, *,
                headers: Optional[dict] = None, n: int = 1, body: Any = None,
                **fields: Any) -> tuple[float, Optional[Throttle]]:
    req = request(n=n, body=body, started_at=clock.monotonic())
    permit = lim.acquire(req)
    admitted = clock.monotonic()
    clock.advance(0.01)
    result = AttemptResult(req, 1, status_code=status,
                           headers=CaseInsensitiveDict(headers or {}), started_at=admitted,
                           duration_s=0.01, **fields)
    result.hints = parse_hints(result.headers, clock.time(),
                               "slow down" if status == 429 else None)
    return admitted, lim.release(permit, result)


def test_release_says_whether_a_refused_call_may_wait_its_turn(clock):
    lim = AdmissionLimiter(max_concurrency=4, clock=clock)
    # A fresh client's first refusals get the benefit of the doubt for a moment ...
    _, verdict = run_attempt(lim, clock, 429, headers={"Retry-After": "1"})
    assert verdict == Throttle(True, "rate", pytest.approx(1.0, abs=0.02))
    # ... but a server that has accepted nothing for seconds is in a storm.
    clock.advance(3.0)
    _, verdict = run_attempt(lim, clock, 429, headers={"Retry-After": "1"})
    assert verdict is not None and not verdict.accepting
    run_attempt(lim, clock)
    _, verdict = run_attempt(lim, clock, 429, headers={"Retry-After": "2"})
    assert verdict is not None and verdict.accepting and verdict.kind == "rate"
    assert AdmissionLimiter(max_concurrency=4, adaptive=False, clock=clock).release(
        object(), answer()) is None


def test_a_refused_configured_rate_shrinks_its_burst_before_the_rate(clock):
    lim = AdmissionLimiter(max_concurrency=4, requests_per_minute=1200, safety_margin=0,
                           clock=clock)  # 20/s, a burst of 20
    run_attempt(lim, clock)
    run_attempt(lim, clock, 429, headers={"retry-after-ms": "10"})
    assert lim._requests.capacity == 10.0
    for n in range(30):  # learning never sends below the configured 20/s
        run_attempt(lim, clock, n=n)
    rate = lim.stats()["models"]["m"]["rate_per_s"]
    assert rate is None or rate >= 20.0


def test_an_answer_saying_none_remain_holds_until_the_next_is_due(clock):
    lim = AdmissionLimiter(max_concurrency=16, clock=clock)
    empty = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0",
             "x-ratelimit-reset-requests": "30s"}
    _, answered_at = run_attempt(lim, clock, headers=empty)[0], clock.monotonic()
    admitted, _ = run_attempt(lim, clock, n=2)
    assert admitted == pytest.approx(answered_at + 0.1)  # 600 per minute: the next in 0.1 s
    window = {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "0",
              "x-ratelimit-reset-requests": "2s"}  # a window's quota, spent, open in 2 s
    run_attempt(lim, clock, headers=window, n=3)
    answered_at = clock.monotonic()
    admitted, _ = run_attempt(lim, clock, n=4)
    assert admitted == pytest.approx(answered_at + 2.0)
    # Stated limits are never used as a pace: plenty remaining, no wait at all.
    plenty = {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9",
              "x-ratelimit-reset-requests": "5s"}
    run_attempt(lim, clock, headers=plenty, n=5)
    answered_at = clock.monotonic()
    admitted, _ = run_attempt(lim, clock, n=6)
    assert admitted - answered_at < 0.05


def test_the_token_estimate_learns_the_servers_tokenizer(clock):
    lim = AdmissionLimiter(max_concurrency=4, tokens_per_minute=600_000, clock=clock)
    body = {"messages": [{"role": "user", "content": "x" * 400}]}  # 100 tokens estimated
    for n in range(10):
        run_attempt(lim, clock, n=n, body=body, input_tokens=130, output_tokens=5)
    assert lim.stats()["models"]["m"]["token_ratio"] == pytest.approx(1.3, rel=0.01)


# -- end to end, against the sandbox -----------------------------------------------------


def many(client: cometkit.Client, count: int) -> list:
    return list(client.map(
        lambda i: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"p{i}"}]),
        range(count), return_exceptions=True))


@pytest.mark.parametrize("retry_after", ["none", "seconds"])
def test_no_call_fails_while_the_server_accepts_even_with_one_attempt_allowed(retry_after):
    with Sandbox(rps=10, burst=2, latency_s=0.01, retry_after=retry_after) as sb:
        with cometkit.Client("k", sb.base_url, concurrency=8,
                             plugins={"backoff": {"max_attempts": 1}}) as client:
            results = many(client, 40)
            stats = client.stats
        refused = sb.stats()["attempts_by_status"].get(429, 0)
    assert [r for r in results if isinstance(r, Exception)] == []
    assert stats["failures"] == 0 and stats["attempts"] == 40 + refused
    assert refused < 20  # probes per limit, not a retry per waiting call


def test_a_server_refusing_everything_still_gets_at_most_two_attempts_per_call():
    with Sandbox(always_429=True, retry_after_value_s=0.05, retry_after="ms") as sb:
        with cometkit.Client("k", sb.base_url, concurrency=16,
                             plugins={"backoff": {"base_delay": 0.01, "max_delay": 0.02,
                                                  "jitter": "none"}}) as client:
            results = many(client, 60)
        attempts = sb.stats()["attempts"]
    assert all(isinstance(r, RateLimitError) for r in results)
    assert attempts <= 2 * 60


def test_a_quota_429_fails_at_once_even_while_others_are_accepted():
    with Sandbox(faults={"quota": 0.3}, seed=3) as sb:
        with cometkit.Client("k", sb.base_url, concurrency=4) as client:
            results = many(client, 30)
        quota = sb.stats()["faults_injected"].get("quota", 0)
    failed = [r for r in results if isinstance(r, Exception)]
    assert quota > 0 and len(failed) == quota
    assert all(isinstance(r, RateLimitError) and r.code == "insufficient_quota" for r in failed)


def test_status_errors_carry_the_servers_hint_whoever_raises_them():
    with Sandbox(always_429=True, retry_after_value_s=3) as sb:
        with cometkit.Client("k", sb.base_url, plugins={"backoff": False}) as client:
            with pytest.raises(RateLimitError) as info:
                client.chat.completions.create(model="m", messages=[])
    assert info.value.retry_after_s == 3.0


def test_history_is_handed_to_the_policy_per_call():
    seen: list = []

    class Recorder:
        def on_call_start(self, request: RequestInfo) -> None:
            pass

        def decide(self, result: AttemptResult) -> RetryDecision:
            seen.append((result.attempt, len(result.history)))
            return RetryDecision(result.attempt < 3, 0.0, "test")

    class Plugin:
        @cometkit.hookimpl
        def cometkit_make_retry_policy(self, ctx: Any) -> Recorder:
            return Recorder()

    with Sandbox(always_429=True, retry_after_value_s=0) as sb:
        with cometkit.Client("k", sb.base_url, extra_plugins=[Plugin()],
                             plugins={"limiter": False}) as client:
            with pytest.raises(RateLimitError):
                client.chat.completions.create(model="m", messages=[])
    assert seen == [(1, 0), (2, 1), (3, 2)]


def test_a_token_refusal_teaches_a_token_rate_not_a_request_rate(clock):
    control = AdaptiveControl(16, clock.monotonic())
    control.note_demand(clock.monotonic(), True)
    for _ in range(20):  # 20 calls of 500 tokens accepted over 2 busy seconds
        sent = clock.monotonic()
        control.on_admit(sent, 500)
        clock.advance(0.1)
        control.on_result(answer(200, started_at=sent, clock=clock), clock.monotonic(),
                          clock.time, charged_tokens=500)
    _, kind = serve(control, clock, 429, headers={"Retry-After": "1"},
                    message="Rate limit reached for gpt-x on tokens per min (TPM)")
    assert kind == "tokens"
    clock.advance(1.0)
    control.on_admit(clock.monotonic(), 500)  # the hold is over: the rate is learned now
    busy_s = 2.0 + 0.01 + 1.0  # the calls, the refused one, the hold
    assert control.token_rate_per_s == pytest.approx(10_000 / busy_s, rel=0.01)
    assert control.rate_per_s is None


def test_the_limiter_paces_tokens_at_the_learned_token_rate(clock):
    lim = AdmissionLimiter(max_concurrency=4, burst=0, clock=clock)  # no burst: pure pace
    body = {"messages": [{"role": "user", "content": "x" * 2000}]}  # 500 tokens estimated
    for n in range(150):  # accepted for 1.5 busy seconds: 500 tokens each
        run_attempt(lim, clock, n=n, body=body, input_tokens=500, output_tokens=0)
    refused_msg = {"Retry-After": "1"}
    req = request(n=999, body=body, started_at=clock.monotonic())
    permit = lim.acquire(req)
    clock.advance(0.01)
    result = AttemptResult(req, 1, status_code=429, headers=CaseInsensitiveDict(refused_msg),
                           started_at=clock.monotonic() - 0.01, duration_s=0.01)
    result.hints = parse_hints(result.headers, clock.time(), "Rate limit reached on tokens")
    verdict = lim.release(permit, result)
    assert verdict is not None and verdict.kind == "tokens" and verdict.accepting
    admitted = [run_attempt(lim, clock, n=1000 + n, body=body, input_tokens=500,
                            output_tokens=0)[0] for n in range(6)]
    rate = lim.stats()["models"]["m"]["token_rate_per_s"]
    assert rate is not None
    # after the hold, calls of 500 tokens go out about 500 / rate apart, not back to back
    gaps = [b - a for a, b in zip(admitted[2:], admitted[3:])]
    assert min(gaps) >= 0.8 * 500 / rate


def test_a_long_hint_that_shrinks_on_the_next_refusal_is_a_time_left_after_all(clock):
    control = AdaptiveControl(16, clock.monotonic())
    for _ in range(5):
        serve(control, clock, latency=0.4)
    serve(control, clock, 429, headers={"Retry-After": "10"})
    assert control.window_s == 10.0  # tentatively
    serve(control, clock, 429, headers={"Retry-After": "3"})  # the probe: 3 s left
    assert control.window_s is None
    assert control.hold_until == pytest.approx(clock.monotonic() + 3, abs=0.5)


def test_calls_without_max_tokens_reserve_the_answers_the_model_gives(clock):
    lim = AdmissionLimiter(max_concurrency=4, tokens_per_minute=600_000, clock=clock)
    body = {"messages": [{"role": "user", "content": "x" * 400}]}  # 100 prompt tokens
    first = lim.acquire(request(body=body))
    assert first.cost == 100  # nothing known about answers yet: none reserved
    lim.release(first, answer(input_tokens=100, output_tokens=60))
    second = lim.acquire(request(body=body, n=2))
    assert second.cost == 160  # the server will charge the answer too
    capped = lim.acquire(request(body={**body, "max_tokens": 20}, n=3))
    assert capped.cost == 120  # an explicit max_tokens is what providers reserve


def test_a_configured_clock_window_is_aligned_from_the_first_call(clock):
    """``window: 60, window_align: clock``: 20 per calendar minute, the first minute included
    (the fake wall clock is 20 s into a minute here)."""
    clock.advance(20.0)
    lim = AdmissionLimiter(max_concurrency=16, requests_per_minute=20, window=60,
                           window_align="clock", clock=clock)
    admitted = [run_attempt(lim, clock, n=n)[0] for n in range(21)]
    assert admitted[19] - admitted[0] < 1.0  # the minute's quota goes out together
    assert (clock.epoch + admitted[20]) % 60 == pytest.approx(WINDOW_SLACK_S, abs=0.01)
    assert admitted[20] - admitted[0] == pytest.approx(40.0 + WINDOW_SLACK_S, abs=0.3)


def test_a_stated_token_limit_paces_tokens_before_any_429(clock):
    lim = AdmissionLimiter(max_concurrency=16, burst=0, safety_margin=0, clock=clock)
    body = {"messages": [{"role": "user", "content": "x" * 4000}]}  # 1000 tokens estimated
    stated = {"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "59000"}
    run_attempt(lim, clock, headers=stated, body=body, input_tokens=1000, output_tokens=0)
    assert lim.stats()["models"]["m"]["token_rate_per_s"] == pytest.approx(1000.0)
    admitted = [run_attempt(lim, clock, n=n, headers=stated, body=body, input_tokens=1000,
                            output_tokens=0)[0] for n in range(4)]
    gaps = [b - a for a, b in zip(admitted, admitted[1:])]
    assert gaps == pytest.approx([1.0] * 3, abs=0.02)  # 1000 tokens at 1000 per second


def test_a_call_that_queued_before_tokens_counted_is_charged_when_admitted():
    """The first answer states a token limit while others wait for a slot: they must go out
    priced (a whole first wave sent uncharged empties the server's bucket)."""
    lim = AdmissionLimiter(max_concurrency=1, burst=0, safety_margin=0)
    body = {"messages": [{"role": "user", "content": "x" * 4000}]}  # 1000 tokens estimated
    first = request(n=1, body=body)
    held = lim.acquire(first)
    assert held.cost == 0  # nothing says tokens count yet
    admitted: list = []
    waiter = threading.Thread(target=lambda: admitted.append(lim.acquire(request(n=2, body=body),
                                                                         10.0)), daemon=True)
    waiter.start()
    assert wait_for(lambda: lim.stats()["waiting"] == 1)
    stated = CaseInsensitiveDict({"x-ratelimit-limit-tokens": "60000000",
                                  "x-ratelimit-remaining-tokens": "59000000"})
    answered = AttemptResult(first, 1, status_code=200, headers=stated, duration_s=0.01)
    answered.hints = parse_hints(stated, NOW)
    lim.release(held, answered)
    waiter.join(10.0)
    assert len(admitted) == 1 and admitted[0].cost == 1000


@pytest.mark.parametrize("remaining, held", [(2, True), (3, True), (4, False)])
def test_requests_admitted_after_an_answer_count_against_what_it_said_remained(
        clock, remaining, held):
    """Four in flight; the first one's answer says ``remaining`` requests are left (no reset,
    as a calendar-minute gateway says): the three sent after it spend three of them, so at
    three or fewer the lane holds now instead of earning 429s."""
    lim = AdmissionLimiter(max_concurrency=16, clock=clock)
    reqs = [request(n=n, started_at=clock.monotonic()) for n in range(4)]
    permits = [lim.acquire(r) for r in reqs]
    stated = CaseInsensitiveDict({"x-ratelimit-limit-requests": "20",
                                  "x-ratelimit-remaining-requests": str(remaining)})
    answered = AttemptResult(reqs[0], 1, status_code=200, headers=stated,
                             started_at=clock.monotonic(), duration_s=0.01)
    answered.hints = parse_hints(stated, clock.time())
    lim.release(permits[0], answered)
    hold = lim.stats()["models"]["m"]["hold_remaining_s"]
    assert (hold > 0) is held
    if held:
        assert hold == pytest.approx(DEFAULT_HOLD_S)  # as a hint-less 429 would, then a probe


def test_a_quota_429_neither_holds_the_limiter_nor_waits_in_its_queue(clock):
    lim = AdmissionLimiter(max_concurrency=4, clock=clock)
    run_attempt(lim, clock)
    req = request(n=2, started_at=clock.monotonic())
    permit = lim.acquire(req)
    result = AttemptResult(req, 1, status_code=429, headers=CaseInsensitiveDict(),
                           started_at=clock.monotonic(), duration_s=0.01)
    result.hints = parse_hints(result.headers, clock.time(),
                               "You exceeded your current quota insufficient_quota")
    verdict = lim.release(permit, result)
    assert verdict is not None and verdict.kind == "quota" and not verdict.accepting
    before = clock.monotonic()
    admitted, _ = run_attempt(lim, clock, n=3)
    assert admitted == pytest.approx(before, abs=0.005)  # no hold: others go on at once


@pytest.mark.parametrize("wait_despite, quota", [(None, False), ([], True)])
def test_the_policys_quota_lists_are_the_limiters_too(wait_despite, quota):
    """A new-api overload ("insufficient_quota ... saturated, please try again later") is a
    limit to wait for under the default lists, a spent quota once ``wait_despite`` is empty:
    the limiter reads the 429 exactly as the retry policy does, whichever lists it has."""
    refusals: list = []

    class Recording(AdmissionLimiter):
        def release(self, permit: Any, result: AttemptResult) -> Any:
            if result.status_code == 429:
                refusals.append(result.hints.refusal if result.hints else None)
            return super().release(permit, result)

    class Plugin:
        @cometkit.hookimpl(tryfirst=True)
        def cometkit_make_limiter(self, ctx: Any) -> AdmissionLimiter:
            return Recording(max_concurrency=4, adaptive=True)

    backoff: dict = {} if wait_despite is None else {"wait_despite": wait_despite}
    with Sandbox(rpm=600, burst=1, overload_style="new-api") as sb:
        with cometkit.Client("k", sb.base_url, concurrency=4, extra_plugins=[Plugin()],
                             plugins={"backoff": backoff}) as client:
            results = many(client, 12)
    failed = [r for r in results if isinstance(r, Exception)]
    assert refusals, "the sandbox's burst of 1 refuses some of 4 calls at once"
    if quota:
        assert set(refusals) == {"quota"}
        assert len(failed) == len(refusals)  # each fails at its first 429: nothing to wait for
        assert all(isinstance(r, RateLimitError) and r.code == "insufficient_quota"
                   for r in failed)
    else:
        assert "quota" not in refusals and not failed


def test_a_fleet_window_quota_counted_short_is_tried_one_higher_until_a_refusal_settles_it(
        clock):
    """Ranks come from the store's count of the fleet's window (see the Redis store): the
    first quota, counted from acceptances this process had heard of, may be short; a window
    whose last allowed rank is accepted tries one more, and a refused rank fixes it."""
    control = AdaptiveControl(16, clock.monotonic(), window_s=None)
    control.window_s, control.window_quota = 10.0, 8  # learned from an early, short count

    def ranked(status: int, rank: int) -> None:
        sent = clock.monotonic()
        control.on_admit(sent)
        clock.advance(0.01)
        control.on_result(answer(status, started_at=sent, clock=clock), clock.monotonic(),
                          clock.time, window_rank=rank)

    ranked(200, 8)   # the 8th of 8 accepted: the quota may be higher
    assert control.window_quota == 9 and control.window_quota_open
    ranked(200, 9)
    assert control.window_quota == 10
    ranked(429, 11)  # the 11th refused: the quota is 10, settled
    assert control.window_quota == 10 and not control.window_quota_open
    assert control.learned()["window_settled"] is True  # for the fleet to take in
    ranked(200, 10)  # the quota's last, accepted: no more probing once settled
    assert control.window_quota == 10


def test_a_process_takes_the_fleets_newer_quota_for_a_window_it_knows():
    control = AdaptiveControl(16, 0.0)
    control.window_s, control.window_quota = 10.0, 9
    control.adopt({"window_quota": 10})  # another process counted the same window better
    assert control.window_quota == 10
    control.adopt({"window_s": 60.0, "window_quota": 3})  # another window: not this one's
    assert (control.window_s, control.window_quota) == (10.0, 10)
    assert control.window_quota_open
    control.adopt({"window_settled": True})  # a refused rank elsewhere fixed it
    assert not control.window_quota_open

    joining = AdaptiveControl(16, 0.0)  # a process that meets the window settled
    joining.adopt({"window_s": 10.0, "window_quota": 10, "window_settled": True})
    assert (joining.window_quota, joining.window_quota_open) == (10, False)
