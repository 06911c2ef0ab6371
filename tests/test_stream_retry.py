"""A stream that fails before its first event is a failed attempt, retried like any other when
its kind is opted in (issue 14, part 5); once content was delivered, a failure is a typed
error, never a silently short answer."""

from __future__ import annotations

import json

import pytest
from fakes import FakeClock
from scripted_server import Reply, ScriptedServer, Seen

import cometkit

KEY = "sk-test-stream-retry-91b0"
MESSAGES = [{"role": "user", "content": "hi"}]


def chunk(text: str, finish: bool = False) -> str:
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "m1",
                       "choices": [{"index": 0, "delta": {"content": text},
                                    "finish_reason": "stop" if finish else None}]})


GOOD = Reply(200, events=[chunk("he"), chunk("llo", finish=True), "[DONE]"])
OVERLOADED = json.dumps({"error": {"message": "the server is overloaded",
                                   "type": "server_error"}})
RATE_LIMITED = json.dumps({"error": {"message": "slow down", "code": "rate_limit_exceeded",
                                     "type": "requests"}})


def scripted(first: Reply) -> ScriptedServer:
    """The first request gets ``first``; every later one a good stream."""
    def handler(seen: Seen) -> Reply:
        return first if server.count == 1 else GOOD
    server = ScriptedServer(handler)
    return server


def stream_text(client: cometkit.Client) -> str:
    stream = client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream)


def client_for(server: ScriptedServer, clock: FakeClock, retry_on: list) -> cometkit.Client:
    return cometkit.Client(KEY, server.base_url, clock=clock, config={
        "plugins": {"backoff": {"retry_on": retry_on, "jitter": "none"}}})


@pytest.mark.parametrize("first", [
    Reply(200, events=[OVERLOADED]),          # an error event first
    Reply(200, events=[], action="cut"),      # a reset before any event
], ids=["error-event", "reset-before-any-event"])
def test_a_stream_failing_before_its_first_event_is_retried_when_opted_in(first):
    clock = FakeClock()
    with scripted(first) as server, client_for(server, clock, [429, 500, 503, "read"]) as client:
        assert stream_text(client) == "hello"
        assert server.count == 2
    assert clock.sleeps == [0.5]  # one retry, after the temporary failure's first wait


def test_a_rate_limit_event_first_is_a_429_retried_by_default():
    clock = FakeClock()
    with scripted(Reply(200, events=[RATE_LIMITED])) as server, \
            client_for(server, clock, [429]) as client:
        assert stream_text(client) == "hello"
        assert server.count == 2


def test_not_opted_in_the_error_event_is_raised_by_create_as_its_typed_error():
    clock = FakeClock()
    with scripted(Reply(200, events=[OVERLOADED])) as server, \
            client_for(server, clock, [429]) as client:
        with pytest.raises(cometkit.InternalServerError) as info:
            client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
        assert server.count == 1
    assert info.value.status_code == 500 and "overloaded" in str(info.value)
    assert info.value.type == "server_error"


def test_after_content_a_broken_stream_is_a_typed_error_and_never_retried():
    clock = FakeClock()
    first = Reply(200, events=[chunk("he")], action="cut")
    with scripted(first) as server, client_for(server, clock, [429, 500, "read"]) as client:
        stream = client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
        got = []
        with pytest.raises(cometkit.APIConnectionError) as info:
            for c in stream:
                got.append(c.choices[0].delta.content)
        assert got == ["he"]
        assert server.count == 1
    assert info.value.stage == "read"  # mapped by the transport, as for a whole answer


def test_the_transport_raises_only_cometkits_errors_with_their_stage():
    """The transport owns its errors: requests' and urllib3's become cometkit's in one
    place, for a connection refused before anything was sent as for a stream."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens
    with cometkit.Client(KEY, f"http://127.0.0.1:{port}/v1", config={"plugins": {}}) as client:
        with pytest.raises(cometkit.APIConnectionError) as info:
            client.transport.send("POST", "/chat/completions", b"{}")
    assert info.value.stage == "connect"
    assert type(info.value).__module__.startswith("cometkit")
