"""The ``backoff`` retry policy, decision by decision, with a fake clock and fixed randomness."""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
from pathlib import Path

import pytest
from fakes import EPOCH, FakeClock, FixedRandom
from requests.structures import CaseInsensitiveDict

from cometkit import (
    APIConnectionError,
    APITimeoutError,
    AttemptResult,
    ClientContext,
    ConfigError,
    InternalServerError,
    RateLimitError,
    RequestInfo,
)
from cometkit._docgen import extract_block, reference_markdown
from cometkit.options import validate_section
from cometkit_plugins import backoff
from cometkit_plugins.backoff import OPTIONS, BackoffPolicy, RetryBudget


def make_request(clock: FakeClock, request_id: str = "ck-1", model: str = "gpt-x") -> RequestInfo:
    return RequestInfo(request_id, "chat", "POST", "/chat/completions", model,
                       started_at=clock.monotonic())


def rate_limited(request: RequestInfo, attempt: int = 1, headers=None, code=None,
                 message: str = "slow down", history: tuple = (),
                 throttle=None) -> AttemptResult:
    body = {"error": {"message": message, "code": code}}
    error = RateLimitError(f"Error code: 429 - {message}", status_code=429,
                           request_id="req-provider-1", body=body, code=code)
    return AttemptResult(request, attempt, status_code=429,
                         headers=CaseInsensitiveDict(headers or {}), error=error, error_code=code,
                         history=history, throttle=throttle)


def status_failure(request: RequestInfo, status: int, attempt: int = 1) -> AttemptResult:
    error = InternalServerError(f"Error code: {status} - oops", status_code=status,
                                request_id="req-provider-2")
    return AttemptResult(request, attempt, status_code=status, headers={}, error=error)


def connection_failure(request: RequestInfo, stage: str, attempt: int = 1) -> AttemptResult:
    return AttemptResult(request, attempt, error=APIConnectionError(stage=stage),
                         error_stage=stage)


def policy(clock: FakeClock, fraction: float = 0.0, **options) -> BackoffPolicy:
    options.setdefault("jitter", "none")
    options.setdefault("budget_floor", 100)  # budget tests set their own
    return BackoffPolicy(clock=clock, rng=FixedRandom(fraction), **options)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- options and hooks ------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    options = validate_section(OPTIONS, {})
    assert options == {
        "retry_on": [429], "max_attempts": 5, "base_delay": 1.0, "failure_base_delay": 0.5,
        "max_delay": 30.0,
        "jitter": "additive", "max_retry_after": 120.0, "deadline": None,
        "budget_ratio": 0.2, "budget_floor": 5, "budget_window": 10.0,
        "give_up_codes": sorted(backoff.HOPELESS_ERROR_CODES),
        "wait_despite": list(backoff.WAIT_DESPITE_CODE),
    }
    built = BackoffPolicy.from_options(options)
    assert built.retry_on == {429} and built.max_attempts == 5 and built.jitter == "additive"


def failed_with(kind: object, request: RequestInfo, attempt: int) -> AttemptResult:
    if kind == 429:
        return rate_limited(request, attempt)
    if kind == "connect":
        return connection_failure(request, "connect", attempt)
    return status_failure(request, int(kind), attempt)  # type: ignore[call-overload]


@pytest.mark.parametrize(("kind", "first_wait_s"), [(429, 1.0), (503, 0.5), ("connect", 0.5)])
def test_a_429_waits_base_delay_and_a_temporary_failure_failure_base_delay(clock, kind,
                                                                          first_wait_s):
    p = policy(clock, retry_on=[429, 503, "connect"])
    request = make_request(clock)
    waits = [p.decide(failed_with(kind, request, attempt)).delay_s for attempt in (1, 2, 3)]
    assert waits == [first_wait_s, 2 * first_wait_s, 4 * first_wait_s]


def test_additive_jitter_is_at_most_the_base_when_the_base_is_under_a_second(clock):
    p = policy(clock, fraction=1.0, jitter="additive", retry_on=[429, 503])
    request = make_request(clock)
    assert p.decide(failed_with(503, request, 1)).delay_s == pytest.approx(0.5 + 0.5)
    assert p.decide(failed_with(429, request, 1)).delay_s == pytest.approx(1.0 + 1.0)


def test_retry_on_accepts_the_opt_in_list():
    options = validate_section(OPTIONS, {"retry_on": [429, "503", "connect", "READ", 524]})
    assert options["retry_on"] == [429, 503, "connect", "read", 524]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_listing_a_never_retried_status_is_a_clear_config_error(status):
    with pytest.raises(ConfigError) as info:
        validate_section(OPTIONS, {"retry_on": [429, status]}, key_path="plugins.backoff")
    text = str(info.value)
    assert "plugins.backoff.retry_on[1]" in text
    assert f"{status} is never retried" in text
    assert "408, 429, 500, 502, 503, 504, 524, 'connect', 'read'" in text


@pytest.mark.parametrize("item", ["write", 418, True, 2.5, [429]])
def test_retry_on_rejects_unknown_items(item):
    with pytest.raises(ConfigError, match="must be one of 408, 429"):
        validate_section(OPTIONS, {"retry_on": [item]})


@pytest.mark.parametrize("data, key", [
    ({"max_attempts": 0}, "max_attempts"),
    ({"jitter": "random"}, "jitter"),
    ({"base_delay": -1}, "base_delay"),
    ({"deadline": "soon"}, "deadline"),
    ({"budget_ratio": -0.1}, "budget_ratio"),
    ({"budget_window": 0}, "budget_window"),
    ({"retry_on": 429}, "retry_on"),
    ({"max_attemps": 3}, "max_attemps"),
])
def test_invalid_options_name_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        validate_section(OPTIONS, data)
    assert info.value.key == key


def test_direct_construction_validates_too(clock):
    with pytest.raises(ConfigError, match="401 is never retried"):
        BackoffPolicy(retry_on=[429, 401], clock=clock)
    with pytest.raises(ConfigError, match="jitter"):
        BackoffPolicy(jitter="sometimes", clock=clock)


def test_hooks_declare_the_spec_and_build_the_policy_from_the_context(clock):
    spec = backoff.cometkit_plugin_spec()
    assert spec.enabled_by_default is True and spec.options is OPTIONS and spec.summary
    rng = random.Random(1)
    ctx = ClientContext(
        plugin_options={"backoff": validate_section(OPTIONS, {"max_attempts": 2,
                                                              "deadline": 9})},
        concurrency=4, base_url="http://127.0.0.1:1/v1", server_address="127.0.0.1",
        timeout_s=(1.0, 1.0), clock=clock, random=rng)
    built = backoff.cometkit_make_retry_policy(ctx.for_plugin("backoff"))
    assert isinstance(built, BackoffPolicy)
    # the deprecated backoff.deadline is the client's call deadline now, not the policy's
    assert built.max_attempts == 2 and built.deadline is None
    assert built.clock is clock and built.rng is rng
    assert "max_attempts=2" in repr(built)


def test_first_party_hooks_yield_to_third_party_policies():
    assert backoff.cometkit_make_retry_policy.cometkit_impl["trylast"] is True


# -- what is retried --------------------------------------------------------------------------


def test_429_is_retried_by_default_and_nothing_else(clock):
    p = policy(clock)
    request = make_request(clock)
    assert p.decide(rate_limited(request)).retry
    for status in (408, 500, 502, 503, 504, 524):
        decision = p.decide(status_failure(request, status))
        assert not decision.retry and decision.error is None, status
    assert not p.decide(connection_failure(request, "connect")).retry
    assert not p.decide(connection_failure(request, "read")).retry


def test_opted_in_temporary_failures_are_retried(clock):
    p = policy(clock, retry_on=[429, 503, "connect"])
    request = make_request(clock)
    decision = p.decide(status_failure(request, 503))
    assert decision.retry and decision.reason == "503"
    decision = p.decide(connection_failure(request, "connect"))
    assert decision.retry and decision.reason == "connect error"
    assert not p.decide(connection_failure(request, "read")).retry, "read was not listed"
    assert not p.decide(status_failure(request, 502)).retry, "502 was not listed"


def test_read_errors_only_when_listed(clock):
    p = policy(clock, retry_on=["read"])
    request = make_request(clock)
    assert p.decide(connection_failure(request, "read")).retry
    assert not p.decide(connection_failure(request, "connect")).retry
    assert not p.decide(rate_limited(request)).retry


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_are_never_retried(clock, status):
    p = policy(clock, retry_on=list(backoff.RETRYABLE_STATUSES) + ["connect", "read"])
    decision = p.decide(status_failure(make_request(clock), status))
    assert not decision.retry and decision.error is None


def test_a_failure_without_status_or_stage_is_final(clock):
    request = make_request(clock)
    result = AttemptResult(request, 1, error=ValueError("not JSON"))
    assert not policy(clock, retry_on=[429, "read", "connect"]).decide(result).retry


@pytest.mark.parametrize("code", ["insufficient_quota", "billing_hard_limit_reached",
                                  "quota_exceeded", "context_length_exceeded",
                                  "request_too_large"])
def test_a_429_that_waiting_cannot_fix_fails_at_once(clock, code):
    decision = policy(clock).decide(rate_limited(make_request(clock), code=code))
    assert not decision.retry and decision.error is None
    assert code in decision.reason


def test_hopeless_429_found_in_the_body_type_and_the_message(clock):
    p = policy(clock)
    request = make_request(clock)
    by_type = rate_limited(request)
    by_type.error.body = {"error": {"message": "no money", "type": "insufficient_quota"}}
    assert not p.decide(by_type).retry
    too_large = rate_limited(request, code="rate_limit_exceeded",
                             message="Request too large for gpt-4 on tokens per min (TPM)")
    assert not p.decide(too_large).retry
    assert p.decide(rate_limited(request, code="rate_limit_exceeded")).retry


def test_max_attempts_counts_the_first_attempt(clock):
    p = policy(clock, max_attempts=3)
    request = make_request(clock)
    assert p.decide(rate_limited(request, attempt=1)).retry
    assert p.decide(rate_limited(request, attempt=2)).retry
    decision = p.decide(rate_limited(request, attempt=3))
    assert not decision.retry
    assert isinstance(decision.error, RateLimitError)
    assert "gave up after 3 attempts (max_attempts=3)" in str(decision.error)
    assert decision.error.request_id == "req-provider-1"
    assert not policy(clock, max_attempts=1).decide(rate_limited(request)).retry


# -- how long ---------------------------------------------------------------------------------


def delays(p: BackoffPolicy, clock: FakeClock, attempts: int = 7) -> list[float]:
    request = make_request(clock)
    return [p.decide(rate_limited(request, attempt=n)).delay_s for n in range(1, attempts + 1)]


def test_formula_doubles_from_base_delay_up_to_max_delay(clock):
    p = policy(clock, jitter="none", max_attempts=10)
    assert delays(p, clock) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    p = policy(clock, jitter="none", base_delay=0.5, max_delay=3, max_attempts=10)
    assert delays(p, clock, 5) == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_huge_attempt_numbers_stay_at_max_delay(clock):
    p = policy(clock, jitter="none", max_attempts=10_000, budget_floor=10)
    decision = p.decide(rate_limited(make_request(clock), attempt=5000))
    assert decision.delay_s == 30.0


def test_additive_jitter_adds_up_to_one_second(clock):
    p = policy(clock, 0.25, jitter="additive", max_attempts=10)
    assert delays(p, clock) == [1.25, 2.25, 4.25, 8.25, 16.25, 30.25, 30.25]


def test_full_jitter_waits_uniformly_up_to_the_capped_delay(clock):
    p = policy(clock, 0.5, jitter="full", max_attempts=10)
    assert delays(p, clock) == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_decorrelated_jitter_follows_the_aws_formula_per_call(clock):
    seed = 7
    p = BackoffPolicy(jitter="decorrelated", max_attempts=10, budget_floor=50, clock=clock,
                      rng=random.Random(seed))
    first, second = make_request(clock, "ck-a"), make_request(clock, "ck-b")
    got_a, got_b = [], []
    history_a: tuple = ()
    history_b: tuple = ()
    for attempt in range(1, 8):  # two calls interleaved: each has its own history
        decision = p.decide(rate_limited(first, attempt=attempt, history=history_a))
        history_a += (decision,)
        got_a.append(decision.delay_s)
        decision = p.decide(rate_limited(second, attempt=attempt, history=history_b))
        history_b += (decision,)
        got_b.append(decision.delay_s)

    reference = random.Random(seed)
    want_a, want_b, prev_a, prev_b = [], [], 1.0, 1.0
    for _ in range(7):
        prev_a = min(30.0, reference.uniform(1.0, prev_a * 3))
        prev_b = min(30.0, reference.uniform(1.0, prev_b * 3))
        want_a.append(prev_a)
        want_b.append(prev_b)
    assert got_a == want_a and got_b == want_b
    assert all(1.0 <= d <= 30.0 for d in got_a + got_b)


def test_decorrelated_jitter_reads_the_previous_delay_from_the_calls_history(clock):
    p = BackoffPolicy(jitter="decorrelated", max_attempts=5, clock=clock, rng=FixedRandom(1.0))
    request = make_request(clock)
    first = p.decide(rate_limited(request, attempt=1))
    assert first.delay_s == 3.0  # uniform(1, 1 * 3) at its top
    assert p.decide(rate_limited(request, attempt=2, history=(first,))).delay_s == 9.0
    # the policy keeps nothing per call: without the history it starts again from base_delay
    assert p.decide(rate_limited(request, attempt=2)).delay_s == 3.0
    assert not hasattr(p, "_previous_delay")


# -- server hints -----------------------------------------------------------------------------


def http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


@pytest.mark.parametrize("headers, hint", [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"Retry-After": "7"}, 7.0),
    ({"Retry-After": http_date(EPOCH + 1000.0 + 30)}, 30.0),
    ({"x-ratelimit-reset-requests": "250ms"}, 0.25),
    ({"x-ratelimit-reset-requests": "1s"}, 1.0),
    ({"x-ratelimit-reset-requests": "1m30s"}, 90.0),
])
def test_server_hints_win_with_up_to_ten_percent_jitter(clock, headers, hint):
    request = make_request(clock)
    exact = policy(clock, 0.0, jitter="additive").decide(rate_limited(request, 3, headers))
    assert exact.retry and exact.delay_s == pytest.approx(hint)
    most = policy(clock, 1.0, jitter="full").decide(rate_limited(request, 3, headers))
    assert most.delay_s == pytest.approx(hint * 1.1)


def test_hint_jitter_stays_within_ten_percent_with_a_real_rng(clock):
    p = BackoffPolicy(clock=clock, rng=random.Random(3), budget_floor=200)
    request = make_request(clock)
    seen = {p.decide(rate_limited(request, 1, {"Retry-After": "10"})).delay_s
            for _ in range(100)}
    assert all(10.0 <= d <= 11.0 for d in seen)
    assert len(seen) > 50, "the hint jitter should spread clients out"


def test_a_long_hint_is_followed_when_max_retry_after_allows_it(clock):
    p = policy(clock, max_retry_after=600)
    decision = p.decide(rate_limited(make_request(clock), 1,
                                     {"x-ratelimit-reset-requests": "6m0s"}))
    assert decision.retry and decision.delay_s == 360.0


def test_a_hint_over_max_retry_after_fails_at_once_with_the_hint(clock):
    p = policy(clock)
    decision = p.decide(rate_limited(make_request(clock), 1,
                                     {"x-ratelimit-reset-requests": "6m0s"}))
    assert not decision.retry
    error = decision.error
    assert isinstance(error, RateLimitError)
    assert error.status_code == 429 and error.retry_after_s == 360.0
    assert error.request_id == "req-provider-1"
    assert "server asked to wait 360.0 s, over max_retry_after=120 s" in str(error)
    assert "slow down" in str(error), "the server's own message is kept"


def test_a_long_hint_on_a_503_keeps_the_503_type(clock):
    p = policy(clock, retry_on=[503])
    result = status_failure(make_request(clock), 503)
    result.headers = CaseInsensitiveDict({"Retry-After": "3600"})
    decision = p.decide(result)
    assert not decision.retry
    assert type(decision.error) is InternalServerError
    assert decision.error.status_code == 503 and decision.error.retry_after_s == 3600.0


def test_a_429_without_an_error_object_still_gets_a_rate_limit_error(clock):
    request = make_request(clock)
    result = AttemptResult(request, 1, status_code=429,
                           headers=CaseInsensitiveDict({"Retry-After": "500"}))
    decision = policy(clock).decide(result)
    assert not decision.retry
    assert isinstance(decision.error, RateLimitError)
    assert decision.error.retry_after_s == 500.0 and decision.error.status_code == 429


@pytest.mark.parametrize("headers", [
    {"Retry-After": "soon"},
    {"Retry-After": "-5"},
    {"Retry-After": "inf"},
    {"Retry-After": "nan"},
    {"Retry-After": "1e12"},
    {"Retry-After": "Mon, 99 Foo 2024 99:99:99 GMT"},
    {"retry-after-ms": "abc"},
    {"retry-after-ms": "-100"},
    {"x-ratelimit-reset-requests": "6 minutes"},
    {"x-ratelimit-reset-requests": "999999h"},
])
def test_garbage_hints_fall_back_to_the_formula(clock, headers):
    p = policy(clock, 0.5, jitter="additive")
    decision = p.decide(rate_limited(make_request(clock), 2, headers))
    assert decision.retry and decision.delay_s == 2.5


# -- deadline ---------------------------------------------------------------------------------


def make_call(clock: FakeClock, deadline_s: float) -> RequestInfo:
    return RequestInfo("ck-1", "chat", "POST", "/chat/completions", "gpt-x",
                       started_at=clock.monotonic(), deadline_s=deadline_s)


def test_the_call_deadline_refuses_a_wait_that_would_end_at_or_past_it(clock):
    p = policy(clock)
    request = make_call(clock, 10.0)
    clock.advance(5.0)
    assert p.decide(rate_limited(request, attempt=2)).delay_s == 2.0  # 5 + 2 < 10
    clock.advance(2.5)
    decision = p.decide(rate_limited(request, attempt=2))  # 7.5 + 2 < 10: still fits
    assert decision.retry
    decision = p.decide(rate_limited(request, attempt=3))  # 7.5 + 4 > 10
    assert not decision.retry and decision.reason == "deadline"
    # the core turns this into its deadline error; the wait is handed over for its message
    assert decision.past_deadline and decision.delay_s == 4.0
    assert isinstance(decision.error, RateLimitError)
    assert "would pass the deadline of 10 s" in str(decision.error)
    clock.advance(0.5)  # 8 + 2 = 10: no time would be left for the attempt
    assert p.decide(rate_limited(request, attempt=2)).past_deadline


def test_a_refused_retry_takes_nothing_from_the_budget(clock):
    p = policy(clock, budget_floor=1, budget_ratio=0.0)
    assert p.decide(rate_limited(make_call(clock, 1.0), 1, {"Retry-After": "5"})).past_deadline
    assert p.budget.counts() == (0, 0)
    assert p.decide(rate_limited(make_request(clock), 1, {"Retry-After": "5"})).retry


def test_the_deprecated_policy_deadline_serves_calls_without_their_own(clock):
    p = policy(clock, deadline=30.0)
    request = make_request(clock)
    assert p.decide(rate_limited(request, 1, {"Retry-After": "29"})).retry
    clock.advance(2.0)
    assert p.decide(rate_limited(request, 1, {"Retry-After": "29"})).past_deadline
    # the call's own deadline wins over it
    assert p.decide(rate_limited(make_call(clock, 60.0), 1, {"Retry-After": "29"})).retry


def test_deadline_on_a_connection_error_keeps_its_type(clock):
    p = policy(clock, retry_on=["connect"], deadline=0.5)
    request = make_request(clock)
    result = AttemptResult(request, 1, error=APITimeoutError(stage="connect"),
                           error_stage="connect")
    decision = p.decide(result)
    assert not decision.retry
    assert type(decision.error) is APITimeoutError and decision.error.stage == "connect"


# -- retry budget -----------------------------------------------------------------------------


def run_storm(p: BackoffPolicy, clock: FakeClock, calls: int, interleaved: bool) -> tuple:
    """Every attempt gets a 429; returns (attempts, final decisions)."""
    requests_ = [make_request(clock, f"ck-{i}") for i in range(calls)]
    attempts, finals = 0, []
    if not interleaved:
        for request in requests_:
            p.on_call_start(request)
            for attempt in range(1, p.max_attempts + 1):
                attempts += 1
                decision = p.decide(rate_limited(request, attempt))
                clock.advance(0.001)
                if not decision.retry:
                    finals.append(decision)
                    break
        return attempts, finals
    for request in requests_:  # all in flight at once, then retried in rounds
        p.on_call_start(request)
    live = {request.request_id: (request, 1) for request in requests_}
    for _ in range(p.max_attempts):
        for key, (request, attempt) in list(live.items()):
            attempts += 1
            decision = p.decide(rate_limited(request, attempt))
            if decision.retry:
                live[key] = (request, attempt + 1)
            else:
                finals.append(decision)
                del live[key]
        clock.advance(0.01)
    assert not live
    return attempts, finals


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("calls", [1, 10, 100, 1000])
def test_a_storm_of_429s_stays_within_the_retry_budget(clock, calls, interleaved):
    p = policy(clock, 0.5, jitter="full", budget_ratio=0.2, budget_floor=5)
    attempts, finals = run_storm(p, clock, calls, interleaved)
    bound = math.floor(calls * (1 + 0.2) + 5 + 1e-9)
    assert attempts <= bound
    assert attempts >= min(calls * 5, calls + 5), "the floor lets a quiet client retry"
    assert len(finals) == calls
    assert all(isinstance(d.error, RateLimitError) for d in finals)
    if calls >= 100:
        exhausted = [d for d in finals if d.reason == "retry budget exhausted"]
        assert exhausted
        text = str(exhausted[-1].error)
        assert text.startswith("retry budget exhausted:")
        assert "(budget_ratio=0.2, budget_floor=5)" in text
        assert exhausted[-1].error.request_id == "req-provider-1"


def test_the_budget_window_slides(clock):
    p = policy(clock, budget_ratio=0.0, budget_floor=2, budget_window=10.0)
    request = make_request(clock)
    p.on_call_start(request)
    assert p.decide(rate_limited(request, 1)).retry
    assert p.decide(rate_limited(request, 2)).retry
    assert not p.decide(rate_limited(request, 3)).retry
    clock.advance(10.0)
    assert p.decide(rate_limited(request, 3)).retry, "retries older than the window expire"
    assert p.budget.counts() == (0, 1)


def test_budget_exhaustion_logs_one_warning_until_retries_resume(clock, caplog):
    p = policy(clock, budget_ratio=0.0, budget_floor=0)
    request = make_request(clock)
    with caplog.at_level(logging.WARNING, logger="cometkit.backoff"):
        for _ in range(3):
            assert not p.decide(rate_limited(request)).retry
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "retry budget exhausted" in warnings[0].getMessage()


def test_budget_refusal_of_a_503_keeps_the_503(clock):
    p = policy(clock, retry_on=[503], budget_ratio=0.0, budget_floor=0)
    decision = p.decide(status_failure(make_request(clock), 503))
    assert not decision.retry
    assert type(decision.error) is InternalServerError and decision.error.status_code == 503
    assert "retry budget exhausted" in str(decision.error)


def test_retry_budget_counts_calls_and_retries():
    clock = FakeClock()
    budget = RetryBudget(0.5, 1, 4.0, clock)
    for _ in range(4):
        budget.deposit()
    assert [budget.try_withdraw() for _ in range(4)] == [True, True, True, False]
    assert budget.counts() == (4, 3)
    clock.advance(2.0)
    budget.deposit()
    budget.deposit()
    assert budget.try_withdraw() and not budget.try_withdraw()  # 6 * 0.5 + 1 = 4
    clock.advance(2.0)  # the first four calls and three retries left the window
    assert budget.counts() == (2, 1)
    with pytest.raises(ValueError):
        RetryBudget(0.2, 5, 0.0, clock)


def test_concurrent_decisions_keep_consistent_counts(clock):
    p = BackoffPolicy(jitter="decorrelated", max_attempts=4, clock=clock, rng=random.Random(5))
    threads_n, calls_per_thread = 16, 150
    granted = [0] * threads_n
    attempts = [0] * threads_n
    start = threading.Barrier(threads_n)

    def worker(index: int) -> None:
        start.wait(timeout=10)
        for i in range(calls_per_thread):
            request = make_request(clock, f"ck-{index}-{i}")
            p.on_call_start(request)
            history: tuple = ()
            for attempt in range(1, p.max_attempts + 1):
                attempts[index] += 1
                decision = p.decide(rate_limited(request, attempt, history=history))
                if not decision.retry:
                    break
                history += (decision,)
                granted[index] += 1

    threads = [threading.Thread(target=worker, args=(n,), daemon=True)
               for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    calls = threads_n * calls_per_thread
    assert p.budget.counts() == (calls, sum(granted))
    assert sum(granted) <= 0.2 * calls + 5
    assert sum(attempts) == calls + sum(granted)


# -- logging ----------------------------------------------------------------------------------


def test_every_retry_is_logged_at_info_in_the_documented_format(clock, caplog):
    p = policy(clock, retry_on=[429, "connect"])
    request = make_request(clock)
    with caplog.at_level(logging.INFO, logger="cometkit.backoff"):
        p.decide(rate_limited(request, 1, {"retry-after-ms": "1800"}))
        p.decide(connection_failure(request, "connect", attempt=3))
        p.decide(rate_limited(make_request(clock, model=None), 1, {"retry-after-ms": "250"}))
        p.decide(status_failure(request, 400))  # not a retry: no INFO line
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [
        "retry 2/5 of POST /chat/completions model=gpt-x after 429 in 1.8 s",
        "retry 4/5 of POST /chat/completions model=gpt-x after connect error in 2.0 s",
        "retry 2/5 of POST /chat/completions model=- after 429 in 0.25 s",
    ]
    assert all(r.name == "cometkit.backoff" and r.request_id == "ck-1"
               for r in caplog.records if r.levelno == logging.INFO)


# -- documentation ----------------------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins" / "backoff.md"


def test_the_options_table_in_the_docs_is_generated_from_the_schema():
    block = extract_block(DOC.read_text(encoding="utf-8"), "backoff-options")
    assert block == reference_markdown(OPTIONS, ""), (
        "docs/plugins/backoff.md is stale: regenerate the backoff-options block")


def test_the_docs_list_every_hopeless_code_and_the_billed_twice_warning():
    text = DOC.read_text(encoding="utf-8")
    for code in backoff.HOPELESS_ERROR_CODES:
        assert f"`{code}`" in text, code
    assert "can be billed twice" in text
    assert "retry 2/5 of POST /chat/completions model=gpt-4o-mini after 429 in 1.8 s" in text
