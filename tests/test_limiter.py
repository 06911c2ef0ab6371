"""The ``limiter`` plugin: admission, pacing, token accounting and adaptive control.

Timing is driven by a fake clock wherever it matters: the limiter waits on a non-system clock
with ``clock.sleep()``, so a waiting admission jumps straight to the instant it computed and
the test reads that instant exactly. Tests with threads use the real clock, only to show
mutual exclusion and order, and are bounded by join timeouts.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from fakes import EPOCH, FakeClock
from requests.structures import CaseInsensitiveDict

from cometkit import (
    APIConnectionError,
    AttemptResult,
    ClientContext,
    ConfigError,
    RateLimitError,
    RequestInfo,
)
from cometkit._docgen import extract_block, reference_markdown
from cometkit.options import validate_section
from cometkit_plugins import limiter as limiter_plugin
from cometkit_plugins.limiter import OPTIONS, AdmissionLimiter, estimate_tokens
from cometkit_plugins.limiting.adaptive import (
    CONCURRENCY_BACKOFF,
    DEFAULT_HOLD_S,
    INITIAL_LIMIT,
    RATE_BACKOFF,
    RATE_FLOOR,
    RATE_GROWTH_PER_S,
    SOFT_BACKOFF,
    AdaptiveControl,
)

JOIN_S = 10.0


def request(model: Optional[str] = "m", body: Any = None, n: int = 1) -> RequestInfo:
    return RequestInfo(f"ck-{n}", "chat", "POST", "/chat/completions", model, json=body)


def result(req: RequestInfo, status: Optional[int] = 200, *, started_at: float = 0.0,
           duration_s: float = 0.05, headers: Optional[dict] = None,
           input_tokens: Optional[int] = None, output_tokens: Optional[int] = None,
           error: Optional[BaseException] = None) -> AttemptResult:
    return AttemptResult(req, 1, status_code=status, headers=CaseInsensitiveDict(headers or {}),
                         error=error, started_at=started_at, duration_s=duration_s,
                         input_tokens=input_tokens, output_tokens=output_tokens)


def attempt(lim: AdmissionLimiter, clock: FakeClock, status: int = 200, *,
            model: str = "m", duration_s: float = 0.05,
            headers: Optional[dict] = None) -> float:
    """One whole attempt on the fake clock; returns when it was admitted."""
    req = request(model)
    permit = lim.acquire(req)
    admitted = clock.monotonic()
    clock.advance(duration_s)
    lim.release(permit, result(req, status, started_at=admitted, duration_s=duration_s,
                               headers=headers))
    return admitted


def lane(lim: AdmissionLimiter, model: Optional[str] = "m") -> dict:
    return lim.stats()["models"][model]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def start(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def wait_for(predicate, timeout_s: float = JOIN_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


# -- options and hooks -------------------------------------------------------------------------


def test_spec_is_on_by_default_and_documents_every_option_with_its_default():
    spec = limiter_plugin.cometkit_plugin_spec()
    assert spec.enabled_by_default is True and spec.options is OPTIONS and spec.summary
    defaults = validate_section(OPTIONS, {})
    assert defaults == {"max_concurrency": None, "requests_per_minute": None,
                        "tokens_per_minute": None, "burst": 1.0, "adaptive": True,
                        "safety_margin": 0.02, "acquire_timeout": None, "models": {},
                        "window": None, "window_align": "first_request",
                        "starvation_share": 0.1, "starvation_s": 5.0}
    assert all(option.help for option in OPTIONS.values())


def test_docs_table_matches_the_options():
    doc = Path(__file__).resolve().parents[1] / "docs" / "plugins" / "limiter.md"
    block = extract_block(doc.read_text(encoding="utf-8"), "limiter-options")
    assert block == reference_markdown(OPTIONS, "")


@pytest.mark.parametrize("section, key", [
    ({"max_concurrency": 0}, "limiter.max_concurrency"),
    ({"requests_per_minute": 0}, "limiter.requests_per_minute"),
    ({"burst": -1}, "limiter.burst"),
    ({"safety_margin": 0.9}, "limiter.safety_margin"),
    ({"acquire_timeout": -1}, "limiter.acquire_timeout"),
    ({"adaptive": "yes"}, "limiter.adaptive"),
    ({"models": {"gpt-x": {"rpm": 10}}}, "limiter.models.gpt-x.rpm"),
    ({"models": {"gpt-x": {"max_concurrency": 0}}}, "limiter.models.gpt-x.max_concurrency"),
])
def test_invalid_options_name_the_key(section, key):
    with pytest.raises(ConfigError) as info:
        validate_section(OPTIONS, section, key_path="limiter")
    assert info.value.key == key
    with pytest.raises(ConfigError):  # direct construction checks the same schema
        AdmissionLimiter(**{"max_concurrency": 2, **section})


def test_direct_construction_needs_a_concurrency():
    with pytest.raises(ConfigError, match="max_concurrency"):
        AdmissionLimiter(max_concurrency=None)


def test_hook_builds_from_the_context_and_null_concurrency_means_the_clients(clock):
    options = validate_section(OPTIONS, {"requests_per_minute": 120,
                                         "models": {"small": {"max_concurrency": 2}}})
    ctx = ClientContext(plugin_options={"limiter": options}, concurrency=7,
                        base_url="http://127.0.0.1:1/v1", server_address="127.0.0.1",
                        timeout_s=(1.0, 1.0), clock=clock)
    built = limiter_plugin.cometkit_make_limiter(ctx.for_plugin("limiter"))
    assert isinstance(built, AdmissionLimiter)
    assert built.max_concurrency == 7 and built.requests_per_minute == 120
    assert built.clock is clock
    assert "max_concurrency=7" in repr(built)
    assert limiter_plugin.cometkit_make_limiter.cometkit_impl["trylast"] is True


# -- token estimate ----------------------------------------------------------------------------


def test_estimate_counts_prompt_characters_over_four_plus_max_tokens():
    chat = {"messages": [{"role": "system", "content": "a" * 40},
                         {"role": "user", "content": [{"type": "text", "text": "b" * 20},
                                                      {"type": "image_url", "image_url": {}}]}],
            "max_tokens": 100}
    assert estimate_tokens(chat) == 15 + 100
    assert estimate_tokens({"messages": [{"content": "abcde"}],
                            "max_completion_tokens": 7}) == 2 + 7
    assert estimate_tokens({"input": ["abcd", "efgh"]}) == 2
    assert estimate_tokens({"input": [[1, 2, 3]]}) == 3  # token ids count one each
    assert estimate_tokens({"prompt": "x" * 9}) == 3
    # the Responses API's input items and instructions, Anthropic's system text
    assert estimate_tokens({"input": [{"role": "user", "content": "a" * 8},
                                      {"role": "user", "content": [
                                          {"type": "input_text", "text": "b" * 8}]}],
                            "instructions": "c" * 8, "max_output_tokens": 5}) == 6 + 5
    assert estimate_tokens({"system": "s" * 8, "messages": [{"content": "abcd"}]}) == 3
    assert estimate_tokens({"messages": [], "max_tokens": True}) == 0
    assert estimate_tokens(None) == 0


# -- admission ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_concurrency_cap_holds_under_many_threads(adaptive):
    lim = AdmissionLimiter(max_concurrency=3, adaptive=adaptive)
    lock = threading.Lock()
    in_flight = [0]
    seen_max = [0]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(5):
                req = request(n=i)
                permit = lim.acquire(req, JOIN_S)
                with lock:
                    in_flight[0] += 1
                    seen_max[0] = max(seen_max[0], in_flight[0])
                time.sleep(0.002)
                with lock:
                    in_flight[0] -= 1
                lim.release(permit, result(req, 200, duration_s=0.002))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [start(worker, i) for i in range(12)]
    for thread in threads:
        thread.join(JOIN_S)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert seen_max[0] == 3
    assert lim.stats()["in_flight"] == 0 and lim.stats()["waiting"] == 0


def test_mixed_models_timeouts_and_429s_under_threads_keep_every_count_right():
    lim = AdmissionLimiter(max_concurrency=4, requests_per_minute=60000, tokens_per_minute=6e6,
                           models={"a": {"max_concurrency": 2}})
    lock = threading.Lock()
    in_flight = {"all": 0, "a": 0}
    peak = {"all": 0, "a": 0}
    admitted = [0]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            model = rng.choice(["a", "b", None])
            req = RequestInfo("ck", "chat", "POST", "/chat/completions", model,
                              json={"messages": [{"content": "x" * rng.randint(0, 400)}]})
            try:
                permit = lim.acquire(req, rng.choice([JOIN_S, 0.0]))
            except RateLimitError:
                continue
            with lock:
                admitted[0] += 1
                for key in ("all", model):
                    if key in in_flight:
                        in_flight[key] += 1
                        peak[key] = max(peak[key], in_flight[key])
            time.sleep(rng.random() * 0.001)
            with lock:
                for key in ("all", model):
                    if key in in_flight:
                        in_flight[key] -= 1
            status = rng.choice([200] * 12 + [429, 503, None])
            lim.release(permit, result(req, status, started_at=time.monotonic(),
                                       duration_s=0.001, input_tokens=rng.choice([None, 9]),
                                       headers={"retry-after-ms": "1"} if status == 429
                                       else None))

    threads = [start(worker, i) for i in range(12)]
    for thread in threads:
        thread.join(JOIN_S * 3)
    assert not any(thread.is_alive() for thread in threads)
    assert admitted[0] > 0
    assert peak["all"] <= 4 and peak["a"] <= 2
    stats = lim.stats()
    assert stats["in_flight"] == 0 and stats["waiting"] == 0
    assert all(entry["in_flight"] == 0 and entry["waiting"] == 0
               for entry in stats["models"].values())


def test_waiters_are_admitted_in_arrival_order():
    lim = AdmissionLimiter(max_concurrency=1, adaptive=False)
    first = request(n=0)
    held = lim.acquire(first)
    order: list[int] = []

    def worker(i: int) -> None:
        req = request(n=i)
        permit = lim.acquire(req, JOIN_S)
        order.append(i)
        lim.release(permit, result(req))

    threads = []
    for i in range(1, 9):
        threads.append(start(worker, i))
        wait_for(lambda i=i: lim.stats()["waiting"] == i)
    lim.release(held, result(first))
    for thread in threads:
        thread.join(JOIN_S)
    assert order == list(range(1, 9))


def test_model_override_caps_its_model_without_blocking_others():
    lim = AdmissionLimiter(max_concurrency=3, adaptive=False,
                           models={"small": {"max_concurrency": 1}})
    small = lim.acquire(request("small"))
    with pytest.raises(RateLimitError):
        lim.acquire(request("small"), 0)
    # A call for "small" waiting behind its model's limit does not hold up other models.
    got: list[Any] = []
    waiting = start(lambda: got.append(lim.acquire(request("small"), JOIN_S)))
    wait_for(lambda: lim.stats()["waiting"] == 1)
    big = [lim.acquire(request("big"), 0), lim.acquire(request("big"), 0)]
    with pytest.raises(RateLimitError):  # the client-wide limit still counts every model
        lim.acquire(request("big"), 0)
    assert lane(lim, "small")["max_concurrency"] == 1 and lane(lim, "big")["in_flight"] == 2
    lim.release(small, result(request("small")))
    waiting.join(JOIN_S)
    assert len(got) == 1 and lane(lim, "small")["in_flight"] == 1
    for permit in big + got:
        lim.release(permit, result(request()))
    assert lim.stats()["in_flight"] == 0


def test_requests_per_minute_paces_evenly_after_one_seconds_burst(clock):
    lim = AdmissionLimiter(max_concurrency=100, requests_per_minute=600, safety_margin=0,
                           adaptive=False, clock=clock)
    t0 = clock.monotonic()
    times = [attempt(lim, clock, duration_s=0) for _ in range(25)]
    assert times[:10] == [t0] * 10  # the bucket holds one second's worth: 10 requests
    gaps = [b - a for a, b in zip(times[10:], times[11:])]
    assert gaps == pytest.approx([0.1] * 14)
    assert times[10] == pytest.approx(t0 + 0.1)
    assert len(clock.sleeps) == 15  # one computed wait per paced admission: no polling


def test_safety_margin_and_zero_burst(clock):
    lim = AdmissionLimiter(max_concurrency=100, requests_per_minute=600, safety_margin=0.1,
                           burst=0, adaptive=False, clock=clock)
    times = [attempt(lim, clock, duration_s=0) for _ in range(4)]
    assert [b - a for a, b in zip(times, times[1:])] == pytest.approx([1 / 9] * 3)


def test_model_requests_per_minute_is_its_own_bucket(clock):
    lim = AdmissionLimiter(max_concurrency=100, adaptive=False, safety_margin=0, burst=0,
                           models={"slow": {"requests_per_minute": 60}}, clock=clock)
    t0 = clock.monotonic()
    assert [attempt(lim, clock, model="slow", duration_s=0) for _ in range(3)] == \
        pytest.approx([t0, t0 + 1, t0 + 2])
    assert attempt(lim, clock, model="fast", duration_s=0) == clock.monotonic()


def test_tokens_per_minute_uses_the_estimate_then_what_the_server_charged(clock):
    lim = AdmissionLimiter(max_concurrency=10, tokens_per_minute=6000, safety_margin=0,
                           adaptive=False, clock=clock)  # 100 tokens/s, bucket of 100
    body = {"messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 30}  # 50 + 30
    t0 = clock.monotonic()
    req = request(body=body)
    permit = lim.acquire(req)
    assert clock.monotonic() == t0
    # The server counted a 40-token prompt and keeps the 30 reserved for the answer (it wrote
    # only 5): 70 charged, 10 of the 80 come back (level 20 + 10 = 30).
    lim.release(permit, result(req, input_tokens=40, output_tokens=5, duration_s=0))
    assert lane(lim)["token_ratio"] == pytest.approx(0.8)
    second = lim.acquire(request(body=body))
    # Its tokenizer counts 0.8 of the estimate: the next call costs 40 + 30 = 70.
    assert clock.monotonic() == pytest.approx(t0 + 0.4)  # (70 - 30) / 100 per s
    # A refused call did no work: its whole estimate comes back.
    lim.release(second, result(req, 429, duration_s=0))
    lim.acquire(request(body=body))
    assert clock.monotonic() == pytest.approx(t0 + 0.4)


def test_acquire_timeout_raises_rate_limit_error(clock):
    lim = AdmissionLimiter(max_concurrency=1, acquire_timeout=5, adaptive=False, clock=clock)
    held = lim.acquire(request())
    t0 = clock.monotonic()
    with pytest.raises(RateLimitError, match="acquire_timeout=5 s") as info:
        lim.acquire(request())
    assert info.value.status_code == 429
    assert clock.monotonic() == t0 + 5
    with pytest.raises(RateLimitError):  # an explicit timeout wins over the option
        lim.acquire(request(), 1)
    assert clock.monotonic() == t0 + 6
    assert lim.stats()["waiting"] == 0
    lim.release(held, result(request()))
    assert lim.acquire(request()) is not None


def test_release_after_a_connection_error_frees_the_slot_and_teaches_nothing(clock):
    lim = AdmissionLimiter(max_concurrency=2, clock=clock)
    req = request()
    permit = lim.acquire(req)
    before = lane(lim)
    lim.release(permit, result(req, None, error=APIConnectionError(stage="connect")))
    after = lane(lim)
    assert after["in_flight"] == 0
    assert (after["limit"], after["signals"], after["latency_s"]) == \
        (before["limit"], before["signals"], None)
    lim.release(permit, result(req))  # a second release of the same permit is ignored
    lim.release(object(), result(req))  # and so is something that is not a permit
    assert lim.stats()["in_flight"] == 0


def test_close_wakes_waiters_and_refuses_new_attempts():
    lim = AdmissionLimiter(max_concurrency=1, adaptive=False)
    lim.acquire(request())
    failures: list[BaseException] = []

    def waiter() -> None:
        try:
            lim.acquire(request(), JOIN_S)
        except BaseException as exc:
            failures.append(exc)

    thread = start(waiter)
    wait_for(lambda: lim.stats()["waiting"] == 1)
    lim.close()
    thread.join(JOIN_S)
    assert len(failures) == 1 and isinstance(failures[0], RuntimeError)
    with pytest.raises(RuntimeError, match="closed"):
        lim.acquire(request())
    assert lim.stats()["closed"] is True


# -- adaptive ----------------------------------------------------------------------------------


def test_slow_start_then_aimd_cut_on_429_once_per_burst(clock):
    lim = AdmissionLimiter(max_concurrency=16, clock=clock)
    req = request()
    permit = lim.acquire(req)
    assert lane(lim)["limit"] == INITIAL_LIMIT
    lim.release(permit, result(req, started_at=clock.monotonic()))
    # Until the first signal, every success adds one (doubling per round trip).
    for _ in range(3):
        attempt(lim, clock)
    limit = float(INITIAL_LIMIT + 4)
    assert lane(lim)["limit"] == limit
    # Three attempts in flight together all come back 429: one cut, not three.
    reqs = [request(n=i) for i in range(3)]
    permits = [lim.acquire(r) for r in reqs]
    sent_at = clock.monotonic()
    clock.advance(0.05)
    for r, p in zip(reqs, permits):
        lim.release(p, result(r, 429, started_at=sent_at, headers={"Retry-After": "0"}))
    limit *= CONCURRENCY_BACKOFF
    assert lane(lim)["limit"] == int(limit)
    assert lane(lim)["throttled"] == 3 and lane(lim)["signals"] == 1
    # An attempt sent after the cut that is refused again is news: a second cut.
    attempt(lim, clock, 429, headers={"Retry-After": "0"})
    assert lane(lim)["limit"] == int(limit * CONCURRENCY_BACKOFF)
    assert lane(lim)["signals"] == 2


def test_growth_is_one_per_window_of_successes_after_a_cut(clock):
    lim = AdmissionLimiter(max_concurrency=16, clock=clock)
    attempt(lim, clock, 429, headers={"Retry-After": "0"})
    limit = INITIAL_LIMIT * CONCURRENCY_BACKOFF
    assert lane(lim)["limit"] == int(limit)
    for _ in range(2):  # a window is as many successes as the limit, not one
        window = math.ceil(limit)
        for _ in range(window - 1):
            attempt(lim, clock)
        assert lane(lim)["limit"] == int(limit)
        attempt(lim, clock)
        limit += 1
        assert lane(lim)["limit"] == int(limit)


@pytest.mark.parametrize("retry_after, hold_s", [
    ("2", 2.0),
    # An HTTP-date (whole seconds) is measured against the clock's wall time.
    (email.utils.formatdate(EPOCH + 1004, usegmt=True), 3.95),
    ("soon", DEFAULT_HOLD_S),  # no usable hint: a short default hold
])
def test_429_holds_admissions_for_retry_after(clock, retry_after, hold_s):
    lim = AdmissionLimiter(max_concurrency=4, clock=clock)
    attempt(lim, clock, 429, headers={"Retry-After": retry_after})
    refused_at = clock.monotonic()
    assert refused_at == pytest.approx(1000.05)  # the HTTP-date above is 3.95 s later
    assert lane(lim)["hold_remaining_s"] == pytest.approx(hold_s)
    assert attempt(lim, clock) == pytest.approx(refused_at + hold_s)


def test_after_a_hold_one_probe_goes_then_the_waiters_are_paced_not_a_herd(clock):
    lim = AdmissionLimiter(max_concurrency=16, clock=clock)
    # The first attempt is refused: nothing was accepted yet, so no rate is learned and the
    # pacing after the hold is latency / allowed concurrency.
    attempt(lim, clock, 429, duration_s=0.4, headers={"Retry-After": "1"})
    hold_end = clock.monotonic() + 1
    allowed = lane(lim)["limit"]
    assert allowed == 2 and lane(lim)["rate_per_s"] is None
    # Half-open: the first admission after the hold is a probe ...
    probe_at = attempt(lim, clock, 200, duration_s=0.4)
    assert probe_at == pytest.approx(hold_end)
    reopened = clock.monotonic()
    # ... and once it is accepted the others go, one every latency / allowed.
    admitted = []
    for i in range(allowed):
        lim.acquire(request(n=i))
        admitted.append(clock.monotonic())
    assert admitted == pytest.approx([reopened, reopened + 0.4 / allowed])


def test_while_the_probe_is_out_nobody_else_is_admitted(clock):
    from cometkit_plugins.limiting.adaptive import PROBE_TIMEOUT_S

    lim = AdmissionLimiter(max_concurrency=16, clock=clock)
    attempt(lim, clock, 200)
    attempt(lim, clock, 429, headers={"Retry-After": "1"})
    hold_end = clock.monotonic() + 1
    lim.acquire(request(n=1))  # the probe, never answered
    assert clock.monotonic() == pytest.approx(hold_end)
    lim.acquire(request(n=2))  # waits for the probe's answer, at most PROBE_TIMEOUT_S
    assert clock.monotonic() == pytest.approx(hold_end + PROBE_TIMEOUT_S)


def accept(control: AdaptiveControl, clock: FakeClock, count: int, seconds: float,
           headers: Optional[dict] = None) -> None:
    """``count`` attempts admitted and accepted, evenly over ``seconds``."""
    for _ in range(count):
        sent = clock.monotonic()
        control.on_admit(sent)
        clock.advance(seconds / count)
        control.on_result(result(request(), 200, started_at=sent, duration_s=seconds / count,
                                 headers=headers), clock.monotonic(), clock.time)


def refuse(control: AdaptiveControl, clock: FakeClock, retry_after: str) -> None:
    control.on_result(result(request(), 429, started_at=clock.monotonic(),
                             headers={"Retry-After": retry_after}), clock.monotonic(),
                      clock.time)


def relearn(control: AdaptiveControl, clock: FakeClock, hold_s: float = 0.0) -> Optional[float]:
    """A 429 holding for ``hold_s``, then the next admission (when the rate is learned)."""
    refuse(control, clock, f"{hold_s:g}")
    clock.advance(hold_s)
    control.on_admit(clock.monotonic())
    return control.rate_per_s


def busy_control(clock: FakeClock) -> AdaptiveControl:
    control = AdaptiveControl(16, clock.monotonic())
    control.note_demand(clock.monotonic(), True)
    return control


def test_send_rate_is_learned_from_what_the_server_accepted(clock):
    control = busy_control(clock)
    accept(control, clock, 20, 1.0)
    refuse(control, clock, "1")
    assert control.rate_per_s is None  # learned when the hold ends, the hold included
    clock.advance(1.0)
    control.on_admit(clock.monotonic())
    assert control.rate_per_s == pytest.approx(10.0)  # 20 accepted over 2 busy seconds
    # That admission was the probe of the half-open lane; once it is accepted, the pace is
    # the learned rate.
    sent = clock.monotonic()
    control.on_result(result(request(), 200, started_at=sent, duration_s=0.0), sent,
                      clock.time, probe=True)
    assert control.ready_at(sent) == pytest.approx(sent + 0.1)
    # Successes raise the rate slowly: about RATE_GROWTH_PER_S of it per second (the probe
    # and nine more: a second's worth).
    accept(control, clock, 9, 0.9)
    assert control.rate_per_s == pytest.approx(10.0 * (1 + RATE_GROWTH_PER_S), rel=0.02)


def test_idle_time_does_not_dilute_the_measurement(clock):
    control = busy_control(clock)
    accept(control, clock, 20, 2.0)
    control.note_demand(clock.monotonic(), False)
    clock.advance(60.0)  # nothing to send for a minute
    control.note_demand(clock.monotonic(), True)
    assert relearn(control, clock) == pytest.approx(10.0)


def test_rate_backs_off_when_the_measurement_exceeds_what_was_sent(clock):
    control = busy_control(clock)
    accept(control, clock, 4, 2.0)
    assert relearn(control, clock) == pytest.approx(2.0)
    accept(control, clock, 20, 1.0)  # a burst the server had saved up: not a rate to trust
    before = control.rate_per_s
    assert relearn(control, clock) == pytest.approx(before * RATE_BACKOFF)


def test_a_quick_first_429_backs_off_from_what_was_sent(clock):
    control = busy_control(clock)
    accept(control, clock, 20, 0.5)  # 40/s sent and accepted, then refused: too soon to measure
    assert relearn(control, clock) == pytest.approx(RATE_BACKOFF * 21 / 0.5)  # 21 admissions
    # Refused again before a second's worth of measurement: multiplicative decrease.
    accept(control, clock, 2, 0.1)
    before = control.rate_per_s
    assert relearn(control, clock) == pytest.approx(before * RATE_BACKOFF)


def test_a_measurement_far_below_the_refused_rate_is_floored(clock):
    control = busy_control(clock)
    accept(control, clock, 40, 2.0)
    assert relearn(control, clock) == pytest.approx(20.0)
    accept(control, clock, 2, 0.1)
    before = control.rate_per_s
    # A long hold: 2 accepted over 3.15 busy seconds (a hint in milliseconds: a time left,
    # not a window's length).
    assert relearn(control, clock, hold_s=3.05) == pytest.approx(before * RATE_FLOOR)


def test_a_server_refusing_everything_teaches_no_rate(clock):
    """A spent quota or an outage: concurrency is cut and admissions held, but the send rate
    is not driven to a crawl (the retry budget is what stops such a storm)."""
    lim = AdmissionLimiter(max_concurrency=16, clock=clock)
    for _ in range(6):
        attempt(lim, clock, 429, headers={"retry-after-ms": "1"})
    assert lane(lim)["signals"] == 6 and lane(lim)["limit"] == 1
    assert lane(lim)["rate_per_s"] is None
    # After a success, the next refusal does teach a rate again.
    attempt(lim, clock, 200)
    attempt(lim, clock, 429, headers={"retry-after-ms": "1"})
    attempt(lim, clock, 200)
    assert lane(lim)["rate_per_s"] is not None


def test_low_remaining_requests_slow_down_before_a_429(clock):
    control = busy_control(clock)
    accept(control, clock, 20, 2.0)
    assert relearn(control, clock) == pytest.approx(10.0) and control.signals == 1
    clock.advance(1.0)
    low = {"x-ratelimit-remaining-requests": "1", "x-ratelimit-limit-requests": "20"}
    accept(control, clock, 1, 0.05, headers=low)
    assert control.rate_per_s == pytest.approx(10.0 * SOFT_BACKOFF)
    assert control.signals == 2 and control.throttled == 1
    assert control.hold_until < clock.monotonic()  # no hold: nothing was refused
    # Every answer says so while the server's bucket is low: at most one signal per second.
    accept(control, clock, 5, 0.5, headers=low)
    assert control.signals == 2
    plenty = {"x-ratelimit-remaining-requests": "15", "x-ratelimit-limit-requests": "20"}
    clock.advance(2.0)
    accept(control, clock, 1, 0.05, headers=plenty)
    assert control.signals == 2


def test_adaptive_off_ignores_429s(clock):
    lim = AdmissionLimiter(max_concurrency=3, adaptive=False, clock=clock)
    attempt(lim, clock, 429, headers={"Retry-After": "30"})
    t = clock.monotonic()
    assert attempt(lim, clock) == t
    assert lane(lim) == {"in_flight": 0, "waiting": 0, "max_concurrency": 3, "limit": 3}


def test_a_calls_token_estimate_is_worked_out_once_and_counts_answers_put_back(monkeypatch):
    """Every attempt and every limiter reads ``RequestInfo.token_estimate``: worked out once
    per call. An answer's message appended to ``messages`` (the tool loop) is counted as the
    JSON it is sent as."""
    import cometkit.plugin_api as plugin_api
    from cometkit._objects import ApiObject

    calls = []
    real = plugin_api.estimate_parts
    monkeypatch.setattr(plugin_api, "estimate_parts", lambda body: calls.append(1) or real(body))
    answer = ApiObject({"role": "assistant", "content": "x" * 400})
    request = RequestInfo("ck-t", "chat", "POST", "/chat/completions", "m1",
                          json={"messages": [{"role": "user", "content": "y" * 40}, answer],
                                "max_tokens": 7})
    assert request.token_estimate == (110, 7) == request.token_estimate
    assert len(calls) == 1
