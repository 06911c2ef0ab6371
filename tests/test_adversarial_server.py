"""A misbehaving server against every public call: only cometkit's errors come out, the API
key comes back through no channel, and streams work whatever the framing.

The server (tests/misbehaving_server.py) writes raw bytes: slow drips, silence after the
headers, resets mid-body and mid-stream, bodies delimited by connection close, lying or
unasked encodings, huge bodies and headers, malformed status and chunk lines, and the key
echoed in headers, error bodies, success bodies (JSON-escaped), events, a redirect and an
HTML page. Every wait is bounded: the client's read timeout is short, the server never
stays silent longer than ``SILENCE_S``, and each test has a pytest-timeout ceiling.
"""

from __future__ import annotations

import csv
import json
import threading
from typing import Any, Callable
from urllib.parse import unquote

import pytest
from fakes import FakeClock
from misbehaving_server import (
    BEHAVIOURS,
    MisbehavingServer,
    Request,
    Wire,
    chunk_events,
    completion,
    echo_in_escaped_json,
    echo_in_headers,
    framed,
    head,
    silence_after_headers,
    silence_mid_stream,
)
from test_reliability import call_with_ceiling
from test_security import exception_texts, new_marker

import cometkit
from cometkit import APIConnectionError, APIError, APITimeoutError, CometError

MESSAGES = [{"role": "user", "content": "hello"}]
READ_TIMEOUT_S = 0.5


def _stream(client: cometkit.Client) -> Any:
    return [chunk.to_dict() for chunk in client.chat.completions.create(
        model="m1", messages=MESSAGES, stream=True)]


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, cometkit.ApiObject) else value


#: Every public way to make a call, each reduced to plain data (or an exception).
OPERATIONS: dict[str, Callable[[cometkit.Client], Any]] = {
    "create": lambda c: c.chat.completions.create(model="m1", messages=MESSAGES).to_dict(),
    "stream": _stream,
    "embeddings": lambda c: c.embeddings.create(model="e1", input="hello").to_dict(),
    "models.list": lambda c: c.models.list().to_dict(),
    "request": lambda c: _plain(c.request("POST", "/things", json={"stream": False})),
}


def client_for(server: MisbehavingServer, key: str, tmp_path: Any, **kw: Any) -> cometkit.Client:
    config = {"plugins": {"csv_metrics": {"path": str(tmp_path / "attempts.csv"),
                                          "calls_path": str(tmp_path / "calls.csv")}}}
    return cometkit.Client(key, server.base_url, config=config,
                           timeout={"connect": 5, "read": READ_TIMEOUT_S}, **kw)


def shows(key: str, text: str) -> bool:
    """Whether ``text`` shows ``key``, literally or percent-encoded (a redirect URL)."""
    return key in text or key in unquote(text)


def csv_rows(path: Any) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# -------------------------------------------------------------------------------------------
# The property: behaviours x operations
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_no_foreign_exception_and_no_key_from_any_call(behaviour, tmp_path):
    """Whatever the server does, each public call returns or raises one of cometkit's own
    errors; the key shows in no exception (str, repr, traceback, chain, body), in no value
    returned, and in neither metrics CSV."""
    key = new_marker()
    outcomes: dict[str, Any] = {}
    with MisbehavingServer(BEHAVIOURS[behaviour]) as server:
        client = client_for(server, key, tmp_path)
        try:
            for name, operation in OPERATIONS.items():
                outcomes[name] = call_with_ceiling(lambda op=operation: op(client), 30)
        finally:
            client.close()
        arrived = list(server.requests)
    assert len(arrived) == len(OPERATIONS)
    assert all(request.key == key for request in arrived)  # the key really went out
    for name, outcome in outcomes.items():
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, CometError), f"{name}: {outcome!r}"
            assert type(outcome).__module__.startswith("cometkit"), f"{name}: {outcome!r}"
            assert not shows(key, exception_texts(outcome)), f"{name}: the key is in the error"
        else:
            assert not shows(key, json.dumps(outcome)), f"{name}: the key is in the answer"
    for table in ("attempts.csv", "calls.csv"):
        text = (tmp_path / table).read_text(encoding="utf-8")
        assert len(text.splitlines()) == 1 + len(OPERATIONS), table
        assert not shows(key, text), f"the key is in {table}"


def test_the_fixture_covers_every_class_of_misbehaviour():
    """A guard against shrinking the suite: each class the issue names has a behaviour."""
    names = set(BEHAVIOURS)
    for needed in ("slow_drip", "silence_after_headers", "reset_mid_body", "reset_mid_stream",
                   "close_delimited_http10", "close_delimited_http11", "not_utf8",
                   "utf16_with_bom", "gzip_that_is_not", "huge_body", "echo_in_headers",
                   "echo_in_escaped_json", "echo_in_error_status", "echo_in_error_event",
                   "echo_in_non_json", "echo_in_redirect"):
        assert needed in names, needed


# -------------------------------------------------------------------------------------------
# Events as they arrive, whatever the framing
# -------------------------------------------------------------------------------------------

FRAMINGS = {
    "HTTP/1.0": lambda: head("200 OK", {"Content-Type": "text/event-stream"},
                             version="HTTP/1.0"),
    "HTTP/1.1 close-delimited": lambda: head("200 OK", {"Content-Type": "text/event-stream",
                                                        "Connection": "close"}),
    "HTTP/1.1 Content-Length": None,  # filled in per body below
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("framing", list(FRAMINGS))
def test_each_event_arrives_before_the_server_closes(framing, tmp_path):
    """The server sends one event, then waits until the test has received it, then sends
    the rest and closes. Before the fix, nothing came until the close: the first ``next``
    would wait for a server that waits for it. ``ttfc_s`` is measured at the first chunk."""
    first, second = (json.dumps(event).encode() for event in chunk_events())
    body = b"data: " + first + b"\n\ndata: " + second + b"\n\ndata: [DONE]\n\n"
    split = body.index(b"data: ", 1)
    got_first = threading.Event()

    def behaviour(wire: Wire, request: Request) -> None:
        header = FRAMINGS[framing]
        wire.send(header() if header else head("200 OK", {
            "Content-Type": "text/event-stream", "Content-Length": str(len(body)),
            "Connection": "close"}))
        wire.send(body[:split])
        got_first.wait(10)
        wire.send(body[split:])

    clock = FakeClock()
    with MisbehavingServer(behaviour) as server:
        with client_for(server, "sk-test-key-framing", tmp_path, clock=clock) as client:
            stream = client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
            clock.advance(0.25)  # headers to first event
            chunks = iter(stream)
            head_chunk = call_with_ceiling(lambda: next(chunks), 5)
            assert not isinstance(head_chunk, Exception), repr(head_chunk)
            assert head_chunk.choices[0].delta.content == "Hel"
            clock.advance(5.0)  # the rest takes long
            got_first.set()
            rest = call_with_ceiling(lambda: list(chunks), 10)
    assert [c.choices[0].delta.content for c in rest] == ["lo"]
    (row,) = csv_rows(tmp_path / "attempts.csv")
    assert row["outcome"] == "ok"
    assert float(row["ttfc_s"]) == pytest.approx(0.25)
    assert float(row["duration_s"]) == pytest.approx(5.25)


# -------------------------------------------------------------------------------------------
# Timeouts name themselves the same before and inside a stream
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_stall_inside_a_stream_is_a_read_timeout_like_one_before_the_answer(tmp_path):
    with MisbehavingServer(silence_after_headers) as server, \
            client_for(server, "sk-test-key-timeout", tmp_path) as client:
        before = call_with_ceiling(
            lambda: client.chat.completions.create(model="m1", messages=MESSAGES), 10)
    (tmp_path / "s").mkdir()
    with MisbehavingServer(silence_mid_stream) as server, \
            client_for(server, "sk-test-key-timeout", tmp_path / "s") as client:
        stream = client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
        chunks = iter(stream)
        assert next(chunks).choices[0].delta.content == "Hel"
        inside = call_with_ceiling(lambda: next(chunks), 10)
    for outcome in (before, inside):
        assert isinstance(outcome, APITimeoutError), repr(outcome)
        assert outcome.stage == "read"
    assert inside.request_id is None or isinstance(inside.request_id, str)


# -------------------------------------------------------------------------------------------
# A whole JSON answer to a stream request
# -------------------------------------------------------------------------------------------


def _json_answer(body: dict) -> Callable[[Wire, Request], None]:
    def behaviour(wire: Wire, request: Request) -> None:
        wire.send(framed(json.dumps(body).encode(), "application/json",
                         **{"x-request-id": "prov-9"}))
    return behaviour


@pytest.mark.timeout(60)
def test_a_json_error_answered_to_a_stream_request_raises_with_the_servers_message(tmp_path):
    error = {"error": {"message": "You exceeded your current quota", "code":
                       "insufficient_quota"}}
    config_limiter = {"max_concurrency": 1, "acquire_timeout": 5}
    with MisbehavingServer(_json_answer(error)) as server:
        client = cometkit.Client("sk-test-key-json", server.base_url, config={"plugins": {
            "limiter": config_limiter,
            "csv_metrics": {"path": str(tmp_path / "attempts.csv")}}})
        with client:
            for _ in range(2):  # the slot came back: the second is admitted too
                with pytest.raises(APIError) as info:
                    client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
                assert "You exceeded your current quota" in str(info.value)
                assert info.value.code == "insufficient_quota"
                assert info.value.request_id == "prov-9"
                assert not isinstance(info.value, APIConnectionError)
    rows = csv_rows(tmp_path / "attempts.csv")
    assert [row["outcome"] for row in rows] == ["error", "error"]
    assert rows[0]["error_type"] == "APIError"


@pytest.mark.timeout(60)
def test_a_whole_completion_answered_to_a_stream_request_comes_as_one_chunk(tmp_path):
    with MisbehavingServer(_json_answer(completion("all at once"))) as server:
        with client_for(server, "sk-test-key-json", tmp_path) as client:
            stream = client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
            chunks = list(stream)
    assert len(chunks) == 1
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.content == "all at once"
    assert chunks[0].choices[0].finish_reason == "stop"
    assert stream.usage.total_tokens == 5
    (row,) = csv_rows(tmp_path / "attempts.csv")
    assert (row["outcome"], row["input_tokens"], row["output_tokens"]) == ("ok", "3", "2")


# -------------------------------------------------------------------------------------------
# The key in the channels that reach the metrics
# -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", [echo_in_headers, echo_in_escaped_json],
                         ids=lambda b: b.__name__)
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_the_key_as_request_id_or_model_is_blanked_in_answer_and_csv(behaviour, stream,
                                                                    tmp_path):
    key = new_marker()
    with MisbehavingServer(behaviour) as server, client_for(server, key, tmp_path) as client:
        if stream:
            answer = client.chat.completions.create(model="m1", messages=MESSAGES,
                                                    stream=True)
            chunks = list(answer)
            request_id = answer.request_id
            shown = json.dumps([c.to_dict() for c in chunks])
        else:
            answer = client.chat.completions.create(model="m1", messages=MESSAGES)
            request_id = answer._request_id
            shown = json.dumps(answer.to_dict())
    assert request_id == "***"
    assert key not in shown
    if behaviour is echo_in_escaped_json:
        assert '"model": "***"' in shown  # the escaped spelling was found and blanked
    (row,) = csv_rows(tmp_path / "attempts.csv")
    assert row["provider_request_id"] == "***"
    if behaviour is echo_in_escaped_json:
        assert row["response_model"] == "***"


# -------------------------------------------------------------------------------------------
# The event parser, however the bytes are cut
# -------------------------------------------------------------------------------------------


def test_events_are_the_same_however_the_body_is_cut():
    """A body with a byte-order mark, CRLF and LF line ends, a comment, an ``event:`` line
    and a two-line event, cut at every pair of positions: always the same events."""
    from cometkit._sse import iter_sse_data

    body = (b"\xef\xbb\xbf: keep-alive\r\nevent: message\r\ndata: {\"a\": 1}\r\n\r\n"
            b"data: line one\ndata: line two\n\ndata: [DONE]\n\n")
    expected = ['{"a": 1}', "line one\nline two", "[DONE]"]
    assert list(iter_sse_data([body])) == expected
    for first in range(len(body)):
        for second in range(first, len(body), 7):
            pieces = [body[:first], body[first:second], body[second:]]
            assert list(iter_sse_data(pieces)) == expected, (first, second)
