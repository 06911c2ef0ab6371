"""cometkit.httpx: the real openai SDK (and LangChain) send through a cometkit client.

Runs on whichever openai SDK is installed: 3.x sends through httpx2, older releases through
classic httpx (``.ci/run`` runs this file a second time with openai 2.x on the path).
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fakes import FakeClock, FixedRandom
from misbehaving_server import BEHAVIOURS, MisbehavingServer
from scripted_server import Reply, ScriptedServer, chat_body, json_reply, wait_until
from test_client import CountingLimiter

import cometkit
from cometkit.httpx import Transport
from cometkit.sandbox import Sandbox

openai = pytest.importorskip("openai")
HTTPX_NAME = "httpx2" if int(openai.__version__.split(".")[0]) >= 3 else "httpx"
httpx = pytest.importorskip(HTTPX_NAME)

KEY = "sk-test-SECRET-MARKER-4242"
MODEL = "gpt-4o-mini"
EVENTS = [
    json.dumps({"id": "c", "model": "m1", "choices": [{"index": 0,
                                                      "delta": {"content": "Hel"}}]}),
    json.dumps({"id": "c", "model": "m1", "choices": [{"index": 0,
                                                      "delta": {"content": "lo"}}]}),
    json.dumps({"id": "c", "model": "m1", "choices": [],
                "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}),
    "[DONE]",
]


def events_or_completion(seen):
    """Events for a stream request, else a completion."""
    return Reply(200, events=EVENTS) if seen.json().get("stream") else json_reply(200, chat_body())


@pytest.fixture
def no_plugins(monkeypatch):
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "")


def ask(sdk, text, **kw):
    return sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                       **kw)


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_a_rate_limited_workload_is_answered_with_cometkit_retries_only(tmp_path, caplog):
    metrics = tmp_path / "m.csv"
    config = {"concurrency": 4, "plugins": {"csv_metrics": {"path": str(metrics)}}}
    caplog.set_level(logging.WARNING, logger="cometkit")
    with Sandbox(rps=10, burst=2, api_key=KEY) as sandbox, \
            cometkit.Client(KEY, sandbox.base_url, config=config) as client:
        sdk = client.openai()
        assert sdk.max_retries == 0
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: ask(sdk, f"prompt {i}"), range(24)))
        stats = sandbox.stats()
        sdk.close()
        assert [a.choices[0].message.content for a in answers] == [
            f"echo: prompt {i}" for i in range(24)]
        assert client.stats["calls"] == 24
    refused = stats["attempts_by_status"].get(429, 0)
    assert refused > 0, stats  # the limit was hit ...
    assert client.stats["retries"] == refused == stats["attempts"] - 24  # ... cometkit retried
    assert "x-stainless-retry-count" not in caplog.text  # ... and the SDK never did
    rows = list(csv.DictReader(metrics.open()))
    assert len(rows) == stats["attempts"]
    assert {r["model"] for r in rows} == {MODEL}
    assert {r["route"] for r in rows} == {"/chat/completions"}
    ok = [r for r in rows if r["outcome"] == "ok"]
    assert len(ok) == 24 and all(int(r["input_tokens"]) > 0 and int(r["output_tokens"]) > 0
                                 for r in ok)
    assert all(r["provider_request_id"].startswith("req_") for r in rows)
    assert KEY not in metrics.read_text()


def test_when_cometkit_gives_up_the_sdk_raises_its_own_rate_limit_error():
    reply = json_reply(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                       **{"retry-after": "0", "x-request-id": "req_429"})
    config = {"plugins": {"limiter": False, "backoff": {"max_attempts": 3}}}
    with ScriptedServer(lambda seen: reply) as srv, \
            cometkit.Client(KEY, srv.base_url, config=config, clock=FakeClock(),
                            rng=FixedRandom(0.5)) as client:
        with pytest.raises(openai.RateLimitError) as info:
            ask(client.openai(), "hi")
    error = info.value
    assert not isinstance(error, cometkit.CometError)
    assert error.status_code == 429 and error.request_id == "req_429"
    assert error.response.headers["retry-after"] == "0"  # the server's own answer
    assert srv.count == client.stats["attempts"] == 3  # every attempt was cometkit's ...
    assert client.stats["failures"] == 1
    assert {s.headers.get("x-stainless-retry-count") for s in srv.seen} == {"0"}  # none the SDK's


def test_a_refused_connection_is_the_sdks_connection_error_not_a_timeout(no_plugins):
    with cometkit.Client(KEY, f"http://127.0.0.1:{free_port()}/v1") as client:
        with pytest.raises(openai.APIConnectionError) as info:
            ask(client.openai(), "hi")
    assert not isinstance(info.value, openai.APITimeoutError), info.value
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_a_read_timeout_is_the_sdks_timeout_error(no_plugins):
    reply = Reply(200, json.dumps(chat_body()).encode(), delay_s=3)
    with ScriptedServer(lambda seen: reply) as srv, \
            cometkit.Client(KEY, srv.base_url, timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError) as info:
            ask(client.openai(), "hi")
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)


def test_the_clients_deadline_bounds_a_call_of_the_sdk_as_it_bounds_its_own(no_plugins):
    """The transport's calls are the client's calls: its ``deadline`` cuts the read timeout
    (30 s here) to what is left, and the SDK raises its own timeout error."""
    reply = Reply(200, json.dumps(chat_body()).encode(), delay_s=3)
    with ScriptedServer(lambda seen: reply) as srv, \
            cometkit.Client(KEY, srv.base_url, timeout=30, deadline=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            ask(client.openai(), "hi")
        assert client.stats["failures"] == 1


def test_an_error_answer_reaches_the_sdk_without_the_key(no_plugins):
    reply = json_reply(400, {"error": {"message": f"bad key {KEY}", "type": "invalid"}})
    with ScriptedServer(lambda seen: reply) as srv, \
            cometkit.Client(KEY, srv.base_url) as client:
        with pytest.raises(openai.BadRequestError) as info:
            ask(client.openai(), "hi")
    assert KEY not in str(info.value) and KEY not in info.value.response.text
    assert srv.count == 1


class TestStreams:
    def test_a_stream_holds_its_slot_until_exhausted_and_records_its_usage(self, tmp_path):
        limiter = CountingLimiter()
        metrics = tmp_path / "m.csv"
        config = {"plugins": {"csv_metrics": {"path": str(metrics)}}}
        with ScriptedServer(events_or_completion) as srv, \
                cometkit.Client(KEY, srv.base_url, config=config,
                                extra_plugins=[limiter]) as client:
            stream = ask(client.openai(), "hi", stream=True)
            assert limiter.held == 1  # the answer's headers are in; its body is not
            text = "".join(c.choices[0].delta.content for c in stream if c.choices)
            assert text == "Hello"
            assert limiter.held == 0 and limiter.released == 1  # given back at its end
        row, = csv.DictReader(metrics.open())
        assert (row["model"], row["response_model"]) == (MODEL, "m1")
        assert (row["input_tokens"], row["output_tokens"]) == ("4", "2")
        assert row["outcome"] == "ok" and row["ttfc_s"] != ""

    @pytest.mark.parametrize("how", ["close", "context", "gc"])
    def test_a_stream_left_early_gives_its_slot_back(self, how, no_plugins):
        limiter = CountingLimiter()
        with ScriptedServer(events_or_completion) as srv, \
                cometkit.Client(KEY, srv.base_url, extra_plugins=[limiter]) as client:
            sdk = client.openai()
            stream = ask(sdk, "hi", stream=True)
            assert limiter.held == 1
            if how == "close":
                next(iter(stream))
                stream.close()
            elif how == "context":
                with stream:
                    next(iter(stream))
            else:
                next(iter(stream))
                del stream
                gc.collect()
            assert wait_until(lambda: limiter.held == 0)
            assert limiter.released == 1
            assert ask(sdk, "again").choices[0].message.content == "hi"  # still usable

    def test_the_sandbox_stream_reports_the_last_usage_event(self, tmp_path):
        metrics = tmp_path / "m.csv"
        config = {"plugins": {"csv_metrics": {"path": str(metrics)}}}
        with Sandbox() as sandbox, cometkit.Client(KEY, sandbox.base_url,
                                                   config=config) as client:
            stream = ask(client.openai(), "a few words here", stream=True,
                         stream_options={"include_usage": True})
            chunks = list(stream)
        usage = chunks[-1].usage
        row, = csv.DictReader(metrics.open())
        assert (int(row["input_tokens"]), int(row["output_tokens"])) == (
            usage.prompt_tokens, usage.completion_tokens)


def test_an_error_event_fails_the_attempt_and_the_sdk_raises_without_the_key(tmp_path):
    metrics = tmp_path / "m.csv"
    config = {"plugins": {"csv_metrics": {"path": str(metrics)}}}
    events = [EVENTS[0], json.dumps({"error": {"message": f"overloaded {KEY}",
                                               "type": "server_error"}})]
    with ScriptedServer(lambda seen: Reply(200, events=events)) as srv, \
            cometkit.Client(KEY, srv.base_url, config=config) as client:
        with pytest.raises(openai.APIError) as info:
            list(ask(client.openai(), "hi", stream=True))
        assert wait_until(lambda: client.stats["attempts"] == 1)
    assert "overloaded" in str(info.value) and KEY not in str(info.value)
    row, = csv.DictReader(metrics.open())
    assert (row["outcome"], row["error_type"]) == ("error", "APIError")


@pytest.mark.parametrize("opted_in", [True, False])
def test_an_error_event_first_is_retried_by_cometkit_when_opted_in(opted_in, tmp_path):
    """A stream that fails at its first event fails its attempt: cometkit retries it (the
    SDK then reads the good stream), or, not opted in, hands the SDK the stream as it came,
    whose error event the SDK raises as its own."""
    overloaded = json.dumps({"error": {"message": "the server is overloaded",
                                       "type": "server_error"}})
    seen = []

    def handler(request):
        seen.append(request)
        return Reply(200, events=[overloaded] if len(seen) == 1 else EVENTS)

    clock = FakeClock()
    retry_on = [429, 500] if opted_in else [429]
    with ScriptedServer(handler) as srv, cometkit.Client(KEY, srv.base_url, clock=clock, config={
            "plugins": {"backoff": {"retry_on": retry_on, "jitter": "none"}}}) as client:
        sdk = client.openai()
        if opted_in:
            text = "".join(c.choices[0].delta.content or "" for c in ask(sdk, "hi", stream=True)
                           if c.choices)
            assert text == "Hello"
        else:
            with pytest.raises(openai.APIError) as info:
                list(ask(sdk, "hi", stream=True))
            assert "overloaded" in str(info.value)
        assert wait_until(lambda: client.stats["calls"] == 1)
    assert len(seen) == (2 if opted_in else 1)
    assert clock.sleeps == ([0.5] if opted_in else [])


def test_a_redirect_elsewhere_is_refused_and_never_carries_the_key(no_plugins):
    with ScriptedServer() as elsewhere:
        moved = Reply(307, b"", {"Location": elsewhere.base_url + "/chat/completions"})
        with ScriptedServer(lambda seen: moved) as srv, \
                cometkit.Client(KEY, srv.base_url) as client:
            with pytest.raises(openai.APIConnectionError) as info:
                ask(client.openai(), "hi")
        assert elsewhere.count == 0 and srv.count == 1
    assert "not below" in str(info.value.__cause__)


@pytest.mark.parametrize("behaviour,library_error", [("reset_mid_stream", "ReadError"),
                                                     ("silence_mid_stream", "ReadTimeout")])
def test_a_stream_broken_midway_raises_the_librarys_error_and_frees_its_slot(
        behaviour, library_error, no_plugins):
    limiter = CountingLimiter()
    with MisbehavingServer(BEHAVIOURS[behaviour]) as server, \
            cometkit.Client(KEY, server.base_url, timeout=(2, 0.5),
                            extra_plugins=[limiter]) as client:
        stream = ask(client.openai(), "hi", stream=True)
        with pytest.raises(Exception) as info:
            list(stream)
        assert wait_until(lambda: limiter.held == 0)
        assert client.stats["failures"] == 1
    error = info.value
    chain = [error, error.__cause__, error.__context__]
    assert any(type(e).__name__ == library_error and type(e).__module__.startswith(HTTPX_NAME)
               for e in chain if e is not None), chain
    assert not any(isinstance(e, cometkit.CometError) for e in chain)
    assert isinstance(limiter.results[0].error, cometkit.APIConnectionError)  # recorded


def test_sdk_retries_on_top_are_warned_about_once(caplog, no_plugins):
    replies = iter([json_reply(500, {"error": {"message": "boom"}})] * 2
                   + [json_reply(200, chat_body())] * 4)
    lock = threading.Lock()

    def handler(seen):
        with lock:
            return next(replies)

    caplog.set_level(logging.WARNING, logger="cometkit")
    with ScriptedServer(handler) as srv, cometkit.Client(KEY, srv.base_url) as client:
        sdk = client.openai(max_retries=2)
        ask(sdk, "hi")  # two SDK retries after two 500s (cometkit retries none of them)
        ask(sdk, "again")
    assert [s.headers.get("x-stainless-retry-count") for s in srv.seen] == ["0", "1", "2", "0"]
    warnings = [r for r in caplog.records if "x-stainless-retry-count" in r.getMessage()]
    assert len(warnings) == 1 and "multiply" in warnings[0].getMessage()


def test_a_plain_httpx_client_goes_through_the_engine(no_plugins):
    with Sandbox() as sandbox, cometkit.Client(KEY, sandbox.base_url) as client:
        with client.httpx_client(httpx=HTTPX_NAME) as http:
            assert isinstance(http, httpx.Client)
            models = http.get("/models", params={"limit": 2})
            assert models.status_code == 200 and models.json()["data"]
            with pytest.raises(httpx.ConnectError, match="not below"):
                http.get("http://127.0.0.1:1/v1/models")
        assert client.stats["calls"] == 1


def test_the_transport_names_the_library_it_serves(no_plugins):
    with cometkit.Client(KEY, "http://127.0.0.1:1/v1") as client:
        transport = Transport(client)  # by default, the library this openai SDK sends through
        assert transport.httpx is httpx and KEY not in repr(transport)
        with pytest.raises(cometkit.ConfigError, match="httpx2, httpx"):
            Transport(client, httpx="requests")


def test_langchain_invoke_and_stream_go_through_the_limiter(no_plugins):
    langchain_openai = pytest.importorskip("langchain_openai")
    limiter = CountingLimiter()
    with Sandbox() as sandbox, cometkit.Client(KEY, sandbox.base_url,
                                               extra_plugins=[limiter]) as client:
        chat = langchain_openai.ChatOpenAI(model=MODEL, api_key=KEY, base_url=client.base_url,
                                           max_retries=0, http_client=client.httpx_client())
        assert chat.invoke("hello").content == "echo: hello"
        text = "".join(chunk.content for chunk in chat.stream("hello again"))
        assert text == "echo: hello again"
        assert wait_until(lambda: limiter.held == 0)
        assert limiter.released == 2 == client.stats["calls"]
