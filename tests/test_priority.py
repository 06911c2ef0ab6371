"""Priority lanes: how a call names its lane, and how the in-process limiter orders waiters.

Order tests hold the only slot, queue waiters one by one (each thread waits until the limiter
counts it), then let the slot go: with one slot, the order in which workers record their
admission is the order the limiter admitted them. The starvation share is counted on a fake
clock (only ``starvation_s`` needs time to pass). No assertion reads a duration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from fakes import FakeClock
from requests.structures import CaseInsensitiveDict
from scripted_server import ScriptedServer, chat_body, json_reply

import cometkit
from cometkit import AttemptResult, ConfigError, RequestInfo
from cometkit.batch import BatchRunner
from cometkit.options import validate_section
from cometkit.priorities import Priorities
from cometkit_plugins.limiter import OPTIONS, AdmissionLimiter

KEY = "sk-test-SECRET-MARKER-4242"
JOIN_S = 10.0
LANES = {"interactive": 0, "default": 1, "batch": 2}


def request(name: str, priority: str = "default", since: float = 0.0,
            model: Optional[str] = "m") -> RequestInfo:
    return RequestInfo(f"ck-{name}", "chat", "POST", "/chat/completions", model,
                       started_at=since, priority=priority, priority_rank=LANES[priority])


def ok(req: RequestInfo) -> AttemptResult:
    return AttemptResult(req, 1, status_code=200, headers=CaseInsensitiveDict())


def wait_for(condition: Callable[[], bool], timeout_s: float = JOIN_S) -> None:
    event = threading.Event()
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        event.wait(0.005)
    raise AssertionError("condition not reached")


def admission_order(lim: AdmissionLimiter, requests: list[RequestInfo]) -> list[str]:
    """Queue ``requests`` (in this order) behind a held slot, free it, and return the order
    in which the limiter admitted them (one slot: each admission waits for the release of
    the previous one). On a fake clock a timed wait would jump the clock, so waiters wait
    untimed there; the joins bound the test."""
    timeout = JOIN_S if isinstance(lim.clock, cometkit.SystemClock) else None
    held_request = request("held")
    held = lim.acquire(held_request)
    order: list[str] = []

    def worker(req: RequestInfo) -> None:
        permit = lim.acquire(req, timeout)
        order.append(req.request_id[3:])
        lim.release(permit, ok(req))

    threads = []
    for count, req in enumerate(requests, 1):
        thread = threading.Thread(target=worker, args=(req,), daemon=True)
        thread.start()
        threads.append(thread)
        wait_for(lambda count=count: lim.stats()["waiting"] == count)
    lim.release(held, ok(held_request))
    for thread in threads:
        thread.join(JOIN_S)
    assert len(order) == len(requests)
    return order


# -- the in-process limiter --------------------------------------------------------------------


def test_the_highest_lane_goes_first_and_each_lane_is_first_come_first_served():
    lim = AdmissionLimiter(max_concurrency=1, adaptive=False)
    arrivals = [("b1", "batch"), ("d1", "default"), ("i1", "interactive"), ("b2", "batch"),
                ("i2", "interactive"), ("d2", "default")]
    order = admission_order(lim, [request(name, lane, since=n)
                                  for n, (name, lane) in enumerate(arrivals)])
    assert order == ["i1", "i2", "d1", "d2", "b1", "b2"]


def test_a_requeued_call_keeps_its_age_within_its_lane_only():
    """A call back from a 429 (older ``started_at``) goes ahead of younger calls of its own
    lane, never ahead of a higher lane."""
    lim = AdmissionLimiter(max_concurrency=1, adaptive=False)
    order = admission_order(lim, [
        request("b-young", "batch", since=20), request("i", "interactive", since=10),
        request("b-requeued", "batch", since=1), request("d", "default", since=5)])
    assert order == ["i", "d", "b-requeued", "b-young"]


def test_a_starving_lower_lane_gets_its_share_of_admissions():
    """Once the batch calls have waited ``starvation_s``, one admission in ten goes to the
    oldest of them while interactive calls wait; no more. (The held slot was the first of
    ten.)"""
    clock = FakeClock()
    lim = AdmissionLimiter(max_concurrency=1, adaptive=False, clock=clock,
                           starvation_share=0.1, starvation_s=5.0)
    now = clock.monotonic()
    waiting = [request("b1", "batch", now), request("b2", "batch", now + 0.1)]
    waiting += [request(f"i{n}", "interactive", now + 1 + n) for n in range(1, 26)]
    clock.advance(40)  # everyone has waited longer than starvation_s
    order = admission_order(lim, waiting)
    interactive = [f"i{n}" for n in range(1, 26)]
    assert order == interactive[:9] + ["b1"] + interactive[9:19] + ["b2"] + interactive[19:]
    assert lim.stats()["waiting_by_priority"] == {}


def test_a_lower_lane_that_has_not_waited_starvation_s_is_not_let_ahead():
    clock = FakeClock()
    lim = AdmissionLimiter(max_concurrency=1, adaptive=False, clock=clock, starvation_s=60)
    now = clock.monotonic()
    waiting = [request("b", "batch", now)]
    waiting += [request(f"i{n}", "interactive", now) for n in range(1, 16)]
    clock.advance(30)
    order = admission_order(lim, waiting)
    assert order == [f"i{n}" for n in range(1, 16)] + ["b"]


def test_a_starvation_share_of_zero_is_strict_priority():
    clock = FakeClock()
    lim = AdmissionLimiter(max_concurrency=1, adaptive=False, clock=clock, starvation_share=0)
    waiting = [request("b", "batch")] + [request(f"i{n}", "interactive", 1.0 + n)
                                         for n in range(1, 16)]
    clock.advance(3600)
    assert admission_order(lim, waiting) == [f"i{n}" for n in range(1, 16)] + ["b"]


def test_a_lower_lane_of_another_model_is_not_held_by_a_higher_lane_blocked_on_its_model():
    lim = AdmissionLimiter(max_concurrency=4, adaptive=False,
                           models={"small": {"max_concurrency": 1}})
    small = lim.acquire(request("s0", "interactive", model="small"))
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(
        lim.acquire(request("s1", "interactive", model="small"), JOIN_S)), daemon=True)
    thread.start()
    wait_for(lambda: lim.stats()["waiting"] == 1)
    assert lim.stats()["waiting_by_priority"] == {"interactive": 1}
    batch = lim.acquire(request("big", "batch", model="big"), 0)  # admitted at once
    lim.release(batch, ok(request("big", "batch", model="big")))
    lim.release(small, ok(request("s0", "interactive", model="small")))
    thread.join(JOIN_S)
    assert len(got) == 1


@pytest.mark.parametrize("section, key", [
    ({"starvation_share": 1.5}, "limiter.starvation_share"),
    ({"starvation_share": -0.1}, "limiter.starvation_share"),
    ({"starvation_s": -1}, "limiter.starvation_s"),
    ({"starvation_s": "soon"}, "limiter.starvation_s"),
])
def test_invalid_starvation_options_name_the_key(section, key):
    with pytest.raises(ConfigError) as info:
        validate_section(OPTIONS, section, key_path="limiter")
    assert info.value.key == key
    with pytest.raises(ConfigError):
        AdmissionLimiter(max_concurrency=2, **section)


def test_starvation_options_come_from_the_configuration():
    with cometkit.Client(KEY, "http://127.0.0.1:9", config={"plugins": {"limiter": {
            "starvation_share": 0.25, "starvation_s": 2}}}) as client:
        limiter = client._plugins.limiter
        assert (limiter.starvation_share, limiter.starvation_s) == (0.25, 2.0)


# -- the lanes in the configuration ------------------------------------------------------------


def test_default_lanes_and_client_default():
    with cometkit.Client(KEY, "http://127.0.0.1:9") as client:
        assert client.priorities == Priorities(("interactive", "default", "batch"), "default")
        assert client.priorities.batch == "batch"


def test_configured_lanes_and_default(tmp_path):
    path = tmp_path / "cometkit.yaml"
    path.write_text("priorities: [urgent, normal, bulk, backfill]\npriority: normal\n")
    with cometkit.Client(KEY, "http://127.0.0.1:9", config=str(path)) as client:
        assert client.priorities.names == ("urgent", "normal", "bulk", "backfill")
        assert client.priorities.default == "normal"
        assert client.priorities.batch == "backfill"  # no lane named batch: the lowest
        assert client.priorities.resolve("bulk") == ("bulk", 2)
    with cometkit.Client(KEY, "http://127.0.0.1:9",
                         config={"priorities": ["high", "mid", "low"]}) as client:
        assert client.priorities.default == "mid"  # no lane named default: the middle one


@pytest.mark.parametrize("text, key, words", [
    ("priority: urgent\n", "priority", "'urgent' is not one of the lanes"),
    ("priorities: []\n", "priorities", "non-empty list"),
    ("priorities: [high, high]\n", "priorities", "listed twice"),
    ("priorities: [high, '']\n", "priorities", "non-empty strings"),
    ("priorities: high\n", "priorities", "non-empty list"),
])
def test_bad_lanes_in_a_file_name_the_file_and_the_key(tmp_path, text, key, words):
    path = tmp_path / "cometkit.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        cometkit.Client(KEY, "http://127.0.0.1:9", config=str(path))
    assert info.value.key == key
    assert str(path) in str(info.value) and words in str(info.value)


# -- a call names its lane ---------------------------------------------------------------------


class RecordingLimiter:
    """A test plugin: admits everything, records each attempt's lane."""

    __name__ = "recording_limiter"

    def __init__(self) -> None:
        self.lanes: list[tuple[str, int]] = []

    @cometkit.hookimpl
    def cometkit_make_limiter(self, ctx: Any) -> Any:
        return self

    def acquire(self, request: RequestInfo, timeout_s: Optional[float] = None) -> object:
        self.lanes.append((request.priority, request.priority_rank))
        return object()

    def release(self, permit: Any, result: AttemptResult) -> None:
        return None

    def close(self) -> None:
        return None


@pytest.fixture
def no_plugins(monkeypatch):
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "")


def answer(seen: Any) -> Any:
    if seen.path.endswith("/models"):
        return json_reply(200, {"object": "list", "data": []})
    if seen.path.endswith("/embeddings"):
        return json_reply(200, {"object": "list", "data": [], "model": "e"})
    return json_reply(200, chat_body())


def test_every_route_carries_its_priority_to_the_limiter(no_plugins):
    limiter = RecordingLimiter()
    with ScriptedServer(answer) as srv, cometkit.Client(
            KEY, srv.base_url, extra_plugins=[limiter], priority="batch") as client:
        client.chat.completions.create(model="m", messages=[], priority="interactive")
        client.chat.completions.create(model="m", messages=[])  # the client's default
        client.embeddings.create(model="e", input="x", priority="default")
        client.models.list(priority="interactive")
        client.request("POST", "/chat/completions", json={"model": "m"}, priority="default")
        assert all("priority" not in seen.json() for seen in srv.seen if seen.body)
    assert limiter.lanes == [("interactive", 0), ("batch", 2), ("default", 1),
                             ("interactive", 0), ("default", 1)]


def test_an_unknown_priority_is_a_value_error_and_nothing_is_sent(no_plugins):
    limiter = RecordingLimiter()
    with ScriptedServer(answer) as srv, cometkit.Client(
            KEY, srv.base_url, extra_plugins=[limiter]) as client:
        with pytest.raises(ConfigError, match="'urgent' is not a priority lane") as info:
            client.chat.completions.create(model="m", messages=[], priority="urgent")
        assert isinstance(info.value, ValueError)
        with pytest.raises(TypeError, match="priority must be a lane name"):
            client.request("GET", "/models", priority=1)
        assert srv.seen == [] and limiter.lanes == []


def test_the_client_wide_priority_override_is_checked(no_plugins):
    with pytest.raises(ConfigError, match="<keyword arguments>: priority: 'nope' is not one "
                                          "of the lanes"):
        cometkit.Client(KEY, "http://127.0.0.1:9", priority="nope")


def test_config_check_catches_a_priority_that_is_not_a_lane(tmp_path):
    path = tmp_path / "cometkit.yaml"
    path.write_text("priorities: [high, low]\npriority: default\n")
    done = subprocess.run([sys.executable, "-m", "cometkit", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert f"{path}: priority: 'default' is not one of the lanes in priorities (high, low)" \
        in done.stderr



# -- the openai SDK through cometkit.httpx -------------------------------------------------------


def test_the_openai_transport_takes_a_lane_and_a_per_request_header_it_never_sends(no_plugins):
    openai = pytest.importorskip("openai")
    limiter = RecordingLimiter()
    with ScriptedServer(answer) as srv, cometkit.Client(
            KEY, srv.base_url, extra_plugins=[limiter]) as client:
        sdk = client.openai(priority="batch")
        sdk.chat.completions.create(model="m", messages=[])
        sdk.chat.completions.create(model="m", messages=[],
                                    extra_headers={"X-Cometkit-Priority": "interactive"})
        client.openai().models.list()  # the client's default lane
        # openai 3.x passes the transport's ValueError on; openai 2.x wraps it in its own
        # APIConnectionError (the ValueError as its cause)
        with pytest.raises((ValueError, openai.APIConnectionError)) as info:
            sdk.chat.completions.create(model="m", messages=[],
                                        extra_headers={"x-cometkit-priority": "urgent"})
        refused = info.value if isinstance(info.value, ValueError) else info.value.__cause__
        assert isinstance(refused, ValueError) and not isinstance(refused, cometkit.CometError)
        assert "x-cometkit-priority header 'urgent' is not a priority lane" in str(refused)
        with pytest.raises(ConfigError, match="'urgent' is not a priority lane"):
            client.openai(priority="urgent")
        with pytest.raises(ValueError, match="give it to its cometkit.httpx.Transport"):
            client.openai(priority="batch", http_client=client.httpx_client())
        assert len(srv.seen) == 3
        assert not any(name.lower() == "x-cometkit-priority"
                       for seen in srv.seen for name in seen.headers)
    assert limiter.lanes == [("batch", 2), ("interactive", 0), ("default", 1)]


# -- batches -------------------------------------------------------------------------------------


def write_lines(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "model": "m", "prompt": "hi"})
                            + "\n" for i in range(n)))


@pytest.mark.parametrize("given, lanes, expected", [
    (None, None, ("batch", 2)),
    ("interactive", None, ("interactive", 0)),
    (None, ["now", "later"], ("later", 1)),  # no lane named batch: the lowest
])
def test_a_batch_sends_in_the_batch_lane_unless_told(tmp_path, no_plugins, given, lanes,
                                                     expected):
    limiter = RecordingLimiter()
    source = tmp_path / "in.jsonl"
    write_lines(source, 3)
    config = {"priorities": lanes} if lanes else {}
    with ScriptedServer(answer) as srv, cometkit.Client(
            KEY, srv.base_url, config=config, extra_plugins=[limiter]) as client, \
            BatchRunner(source, tmp_path / "out.jsonl", priority=given) as runner:
        result = runner.run(client)
    assert result.ok == 3 and limiter.lanes == [expected] * 3


def test_a_batch_with_an_unknown_lane_sends_nothing(tmp_path, no_plugins):
    source = tmp_path / "in.jsonl"
    write_lines(source, 2)
    with ScriptedServer(answer) as srv, cometkit.Client(KEY, srv.base_url) as client, \
            BatchRunner(source, tmp_path / "out.jsonl", priority="urgent") as runner:
        with pytest.raises(ConfigError, match="'urgent' is not a priority lane"):
            runner.run(client)
        assert srv.seen == []


def test_cli_batch_priority_flag(tmp_path, cometkit_sandbox):
    source = tmp_path / "in.jsonl"
    write_lines(source, 4)
    config = tmp_path / "cometkit.yaml"
    config.write_text(f"base_url: {cometkit_sandbox.base_url}\n"
                      "priorities: [urgent, normal, bulk]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("COMETAPI_KEY", "COMETKIT_CONFIG")}
    env["COMETAPI_KEY"] = "sk-x"

    def batch(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cometkit", "batch", str(source), "-o",
                               "out.jsonl", "--config", str(config), "--no-progress", *flags],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    refused = batch("--priority", "batch")  # not a lane of this configuration
    assert refused.returncode != 0
    assert "--priority: priority 'batch' is not a priority lane" in refused.stderr
    assert "urgent, normal, bulk" in refused.stderr
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()
    done = batch("--priority", "urgent")
    assert done.returncode == 0, done.stderr
    assert "4 ok, 0 failed" in done.stderr


# -- end to end: a saturating batch and interactive calls ---------------------------------------


class OrderLog:
    """A test plugin: the real in-process limiter (20 calls/s), each acquire's start and
    admission logged in order."""

    __name__ = "order_log"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str]] = []
        self.inner: Optional[AdmissionLimiter] = None

    @cometkit.hookimpl
    def cometkit_make_limiter(self, ctx: Any) -> Any:
        self.inner = AdmissionLimiter(max_concurrency=ctx.concurrency,
                                      requests_per_minute=1200, adaptive=False)
        return self

    def acquire(self, request: RequestInfo, timeout_s: Optional[float] = None) -> Any:
        with self.lock:
            self.log.append(("wait", request.priority, request.request_id))
        assert self.inner is not None
        permit = self.inner.acquire(request, timeout_s)
        with self.lock:
            self.log.append(("admit", request.priority, request.request_id))
        return permit

    def release(self, permit: Any, result: AttemptResult) -> Any:
        assert self.inner is not None
        return self.inner.release(permit, result)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()

    def batch_admitted_while_waiting(self) -> list[int]:
        """For each interactive call: batch admissions logged between its start and its own
        admission."""
        counts = []
        for index, (event, lane, request_id) in enumerate(self.log):
            if event != "wait" or lane != "interactive":
                continue
            passed = 0
            for later_event, later_lane, later_id in self.log[index + 1:]:
                if later_id == request_id:
                    break
                passed += later_event == "admit" and later_lane == "batch"
            counts.append(passed)
        return counts


def test_interactive_calls_overtake_a_batch_that_saturates_the_limit(no_plugins,
                                                                     cometkit_sandbox):
    log = OrderLog()
    messages = [{"role": "user", "content": "hi"}]
    with cometkit.Client(KEY, cometkit_sandbox.base_url, concurrency=9,
                         extra_plugins=[log]) as client:
        def batch_waiting() -> int:
            assert log.inner is not None
            return log.inner.stats()["waiting_by_priority"].get("batch", 0)

        batch = client.map(lambda i: client.chat.completions.create(
            model="m", messages=messages, priority="batch"), range(80), max_in_flight=8)
        results: list[Any] = []
        drain = threading.Thread(target=lambda: results.extend(batch), daemon=True)
        drain.start()
        for _ in range(5):
            wait_for(lambda: batch_waiting() >= 4)  # a FIFO queue would put it behind them
            client.chat.completions.create(model="m", messages=messages,
                                           priority="interactive")
        drain.join(JOIN_S * 3)
    assert len(results) == 80
    assert len(log.batch_admitted_while_waiting()) == 5
    # Admitted next (one batch admission may be logged late by a thread admitted just before).
    assert max(log.batch_admitted_while_waiting()) <= 1


def test_priorities_doc_states_the_defaults():
    """The priorities half of the Deadlines and priorities page names the defaults."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "deadlines.md").read_text()
    defaults = validate_section(OPTIONS, {})
    assert "`interactive` > `default` > `batch`" in doc
    assert f"starvation_share: {defaults['starvation_share']:g}" in doc
    assert f"starvation_s: {defaults['starvation_s']:g}" in doc


def test_the_requests_adapter_takes_a_lane_and_a_header_it_never_sends(no_plugins):
    import requests

    from cometkit.adapters import CometAdapter

    limiter = RecordingLimiter()
    with ScriptedServer(answer) as srv, cometkit.Client(
            KEY, srv.base_url, extra_plugins=[limiter], priority="batch") as client:
        session = requests.Session()
        session.mount(srv.base_url, CometAdapter(client))
        url = srv.base_url + "/chat/completions"
        session.post(url, json={"model": "m"})  # the client's lane
        session.post(url, json={"model": "m"}, headers={"X-Cometkit-Priority": "interactive"})
        session.mount(srv.base_url, CometAdapter(client, priority="default"))
        session.post(url, json={"model": "m"})
        with pytest.raises(ValueError, match="x-cometkit-priority header 'urgent'"):
            session.post(url, json={"model": "m"}, headers={"x-cometkit-priority": "urgent"})
        with pytest.raises(ConfigError, match="'urgent' is not a priority lane"):
            CometAdapter(client, priority="urgent")
        assert len(srv.seen) == 3
        assert not any(name.lower() == "x-cometkit-priority"
                       for seen in srv.seen for name in seen.headers)
    assert limiter.lanes == [("batch", 2), ("interactive", 0), ("default", 1)]
