"""``<resource>.with_raw_response.<method>``: status, headers (``x-ratelimit-*``), body and
``parse()``, for every method, through the same limiter, retries and sinks as a plain call."""

from __future__ import annotations

import csv
import itertools

import pytest
from fakes import FakeClock
from scripted_server import ScriptedServer, chat_body, json_reply

import cometkit
from cometkit import NotFoundError, RawResponse, Stream

KEY = "sk-test-raw"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def no_plugins(monkeypatch):
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "")


METHODS = {
    "chat": lambda c: c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES),
    "chat namespace": lambda c: c.chat.with_raw_response.completions.create(
        model="gpt-4o-mini", messages=MESSAGES),
    "embeddings": lambda c: c.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="hi"),
    "models.list": lambda c: c.models.with_raw_response.list(),
    "models.retrieve": lambda c: c.models.with_raw_response.retrieve("gpt-4o-mini"),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_answers_raw_with_headers_and_parse(cometkit_sandbox_factory, no_plugins,
                                                         name):
    sandbox = cometkit_sandbox_factory(rpm=6000)
    with cometkit.Client(KEY, sandbox.base_url) as client:
        raw = METHODS[name](client)
    assert isinstance(raw, RawResponse)
    assert raw.status_code == 200
    assert raw.headers["X-Request-Id"] == raw.request_id  # case-insensitive
    assert raw.request_id.startswith("req_sandbox_")
    if name != "models.list" and name != "models.retrieve":
        assert int(raw.headers["x-ratelimit-remaining-requests"]) >= 0
    parsed = raw.parse()
    assert isinstance(parsed, cometkit.ApiObject) and parsed is raw.parse()
    assert parsed._request_id == raw.request_id
    assert raw.json() == parsed.to_dict()
    assert raw.text == raw.content.decode()
    assert raw.retries_taken == 0


def test_a_raw_stream_parses_to_the_stream(cometkit_sandbox, no_plugins):
    with cometkit.Client(KEY, cometkit_sandbox.base_url) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True)
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith("text/event-stream")
        with pytest.raises(TypeError, match="stream"):
            raw.content  # noqa: B018
        with raw.parse() as stream:
            assert isinstance(stream, Stream)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream
                           if chunk.choices)
    assert text == "echo: hi"


def test_an_error_status_still_raises(cometkit_sandbox, no_plugins):
    with cometkit.Client(KEY, cometkit_sandbox.base_url) as client:
        with pytest.raises(NotFoundError) as info:
            client.models.with_raw_response.retrieve("no-such-model")
    assert info.value.code == "model_not_found" and info.value.param == "model"


def test_a_raw_call_is_retried_and_recorded_like_any_other(monkeypatch, tmp_path):
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "backoff,csv_metrics")
    refusal = json_reply(429, {"error": {"message": "slow down"}}, **{"retry-after-ms": "5"})
    success = json_reply(200, chat_body(), **{"x-ratelimit-remaining-requests": "7"})
    answers = itertools.chain([refusal], itertools.repeat(success))
    config = {"plugins": {"csv_metrics": {"path": str(tmp_path / "attempts.csv")}}}
    clock = FakeClock()
    with ScriptedServer(lambda seen: next(answers)) as srv, \
            cometkit.Client(KEY, srv.base_url, config=config, clock=clock) as client:
        raw = client.chat.completions.with_raw_response.create(model="m1", messages=MESSAGES)
    assert raw.retries_taken == 1 and srv.count == 2
    assert raw.headers["x-ratelimit-remaining-requests"] == "7"
    assert raw.parse().choices[0].message.content == "hi"
    with open(tmp_path / "attempts.csv", newline="") as handle:
        outcomes = [row["outcome"] for row in csv.DictReader(handle)]
    assert outcomes == ["retry", "ok"]
