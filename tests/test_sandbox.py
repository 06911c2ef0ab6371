"""The sandbox, driven with raw HTTP (``requests``, ``http.client``, sockets) as any client would.

Only the clock is faked (rate limits run on it); every request crosses a real loopback socket.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import http.client
import inspect
import json
import socket
import struct
import threading
from pathlib import Path

import pytest
import requests
from fakes import FakeClock
from scripted_server import wait_until

from cometkit._checkout import installed
from cometkit.hints import retry_after_s
from cometkit.sandbox import FAULT_KINDS, Sandbox, SandboxProcess
from cometkit.sandbox.cli import add_arguments, run, sandbox_kwargs, to_argv
from cometkit.sandbox.faults import FaultPlan, parse_faults
from cometkit.sandbox.limits import go_duration

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
TIMEOUT = 10


def chat(text="hello world", model=MODEL, **extra):
    return {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": text}], **extra}


def post(sb, route, payload, session=None, **headers):
    sender = session or requests
    return sender.post(sb.base_url + route, json=payload, headers=headers, timeout=TIMEOUT)


def connect(sb):
    host, port = sb.address
    return http.client.HTTPConnection(host, port, timeout=TIMEOUT)


def raw_post(conn, route, payload):
    conn.request("POST", "/v1" + route, body=json.dumps(payload),
                 headers={"Content-Type": "application/json"})
    return conn.getresponse()


def sse_events(body: bytes) -> list:
    blocks = body.decode().split("\n\n")
    assert blocks[-1] == "", "a stream must end with a blank line"
    assert all(block.startswith("data: ") for block in blocks[:-1])
    return [block[len("data: "):] for block in blocks[:-1]]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def sandbox():
    with Sandbox() as sb:
        yield sb


# -- routes and answers ---------------------------------------------------------------------


def test_chat_echoes_the_last_user_message_with_real_usage(sandbox):
    response = post(sandbox, "/chat/completions", chat("hello world"))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-sandbox-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello world",
                                             "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    # "be brief" + "hello world" = 19 chars -> 5 tokens; "echo: hello world" = 17 -> 5.
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert response.headers["x-request-id"].startswith("req_sandbox_")
    second = post(sandbox, "/chat/completions", chat("x", model="claude-3-5-haiku"))
    assert second.json()["id"] != body["id"]
    assert second.json()["model"] == "claude-3-5-haiku"
    assert second.headers["x-request-id"] != response.headers["x-request-id"]


def test_chat_reads_content_parts_and_accepts_no_messages(sandbox):
    parts = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "b"}]}]}
    body = post(sandbox, "/chat/completions", parts).json()
    assert body["choices"][0]["message"]["content"] == "echo: ab"
    empty = post(sandbox, "/chat/completions", {"model": MODEL, "messages": []}).json()
    assert empty["choices"][0]["message"]["content"] == "echo: "
    assert empty["usage"]["prompt_tokens"] == 1  # never zero


def test_max_tokens_cuts_the_answer_with_finish_reason_length(sandbox):
    body = post(sandbox, "/chat/completions", chat("a" * 100, max_tokens=3)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "echo: aaaaaa"
    assert body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_is_chunked_sse_ending_with_done_and_keeps_the_connection(sandbox,
                                                                         include_usage):
    conn = connect(sandbox)
    payload = chat("one two three", stream=True, stream_options={"include_usage": include_usage})
    response = raw_post(conn, "/chat/completions", payload)
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Length") is None
    assert response.getheader("x-request-id")
    events = sse_events(response.read())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(chunk["choices"][0]["delta"].get("content", "")
                   for chunk in chunks if chunk["choices"])
    assert text == "echo: one two three"
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 1
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    usage = [chunk for chunk in chunks if chunk.get("usage")]
    if include_usage:
        assert usage == [chunks[-1]] and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 5,
                                       "total_tokens": 11}
    else:
        assert usage == [] and "usage" not in chunks[0]
    # The same connection carries the next request.
    again = raw_post(conn, "/chat/completions", chat("again"))
    assert json.loads(again.read())["choices"][0]["message"]["content"] == "echo: again"
    conn.close()
    assert sandbox.stats()["connections_accepted"] == 1


def test_embeddings_are_deterministic_unit_vectors_for_strings_lists_and_base64(sandbox):
    one = post(sandbox, "/embeddings", {"model": "text-embedding-3-small", "input": "cat"})
    assert one.status_code == 200
    body = one.json()
    assert body["object"] == "list" and body["model"] == "text-embedding-3-small"
    (item,) = body["data"]
    assert item["index"] == 0 and item["object"] == "embedding"
    vector = item["embedding"]
    assert len(vector) == 32 and abs(sum(v * v for v in vector) - 1.0) < 1e-9
    assert body["usage"] == {"prompt_tokens": 1, "total_tokens": 1}

    many = post(sandbox, "/embeddings", {"model": "e", "input": ["cat", "a dog!!", [1, 2, 3]],
                                         "dimensions": 100}).json()
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert all(len(d["embedding"]) == 100 for d in many["data"])
    assert many["usage"]["prompt_tokens"] == 1 + 2 + 3
    assert many["data"][0]["embedding"] != many["data"][1]["embedding"]

    with Sandbox() as other:  # same input, same vector, whatever the server instance
        again = post(other, "/embeddings", {"model": "x", "input": ["cat"]}).json()
        assert again["data"][0]["embedding"] == vector

    packed = post(sandbox, "/embeddings", {"model": "e", "input": "cat",
                                           "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(vector, abs=1e-6)


def test_models_lists_the_configured_models_and_retrieves_one():
    with Sandbox() as sb:
        listing = requests.get(sb.base_url + "/models", timeout=TIMEOUT).json()
        ids = [model["id"] for model in listing["data"]]
        assert ids == ["gpt-4o-mini", "claude-3-5-haiku", "text-embedding-3-small"]
    with Sandbox(models=["a", "b"]) as sb:
        listing = requests.get(sb.base_url + "/models", timeout=TIMEOUT).json()
        assert listing["object"] == "list"
        assert [(m["id"], m["object"]) for m in listing["data"]] == [("a", "model"),
                                                                    ("b", "model")]
        assert requests.get(sb.base_url + "/models/b", timeout=TIMEOUT).json()["id"] == "b"
        missing = requests.get(sb.base_url + "/models/zzz", timeout=TIMEOUT)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"


def test_unknown_path_wrong_method_and_bad_json_get_openai_errors_on_one_connection(sandbox):
    with requests.Session() as session:
        unknown = post(sandbox, "/nope", {}, session)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["type"] == "invalid_request_error"
        assert "/v1/nope" in unknown.json()["error"]["message"]
        assert unknown.headers["x-request-id"]
        wrong = session.get(sandbox.base_url + "/chat/completions", timeout=TIMEOUT)
        assert wrong.status_code == 405
        bad = session.post(sandbox.base_url + "/chat/completions", data=b"{not json",
                           headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
        no_model = post(sandbox, "/chat/completions", {"messages": []}, session)
        assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
        assert post(sandbox, "/chat/completions", chat(), session).status_code == 200
    stats = sandbox.stats()
    assert stats["attempts_by_status"] == {404: 1, 405: 1, 400: 2, 200: 1}
    assert stats["connections_accepted"] == 1


def read_raw(sb, request: bytes) -> bytes:
    with socket.create_connection(sb.address, timeout=TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                return data
            data += part


@pytest.mark.parametrize("path, expected", [("/v1/chat/completions", 200), ("/v1/x", 404)])
def test_content_length_is_the_exact_body_length(sandbox, path, expected):
    payload = json.dumps(chat("héllo \u2603")).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n"
               "Connection: close\r\n\r\n").encode() + payload
    head, _, body = read_raw(sandbox, request).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {expected} ")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body)
    assert headers["Connection"] == "close"
    json.loads(body)


def test_chunked_request_bodies_are_read(sandbox):
    payload = json.dumps(chat("chunky")).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
    body = read_raw(sandbox, request).partition(b"\r\n\r\n")[2]
    assert json.loads(body)["choices"][0]["message"]["content"] == "echo: chunky"


# -- authentication -------------------------------------------------------------------------


def test_api_key_is_required_when_set_and_never_echoed():
    with Sandbox(api_key="sk-right-key") as sb:
        missing = post(sb, "/chat/completions", chat())
        wrong = post(sb, "/chat/completions", chat(), Authorization="Bearer sk-wrong-key")
        for response in (missing, wrong):
            assert response.status_code == 401
            assert response.headers["x-request-id"]
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["code"] == "invalid_api_key"
            assert "sk-right" not in response.text and "sk-wrong" not in response.text
        assert requests.get(sb.base_url + "/models", timeout=TIMEOUT).status_code == 401
        right = post(sb, "/chat/completions", chat(), Authorization="Bearer sk-right-key")
        assert right.status_code == 200
        assert sb.stats()["attempts_by_status"] == {401: 3, 200: 1}


# -- rate limits ------------------------------------------------------------------------------


def test_rpm_admits_a_burst_then_429s_until_the_clock_refills(clock):
    with Sandbox(rpm=60, burst=3, clock=clock) as sb, requests.Session() as session:
        answers = [post(sb, "/chat/completions", chat(), session) for _ in range(5)]
        assert [answer.status_code for answer in answers] == [200, 200, 200, 429, 429]
        # Remaining is the bucket's fill as a share of the per-minute limit.
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:3]] == [
            "40", "20", "0"]
        refused = post(sb, "/chat/completions", chat(), session)
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert refused.headers["x-ratelimit-limit-requests"] == "60"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"] == "1s"
        assert refused.headers["Retry-After"] == "1"
        assert "x-ratelimit-limit-tokens" not in refused.headers
        # Another model has its own bucket.
        assert post(sb, "/chat/completions", chat(model="other"), session).status_code == 200
        clock.advance(0.5)
        half = post(sb, "/chat/completions", chat(), session)
        assert half.status_code == 429 and half.headers["x-ratelimit-reset-requests"] == "500ms"
        clock.advance(0.5)
        ok = post(sb, "/chat/completions", chat(), session)
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-remaining-requests"] == "0"
        assert ok.headers["x-ratelimit-limit-requests"] == "60"
        clock.advance(60)
        statuses = [post(sb, "/chat/completions", chat(), session).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]  # the bucket never holds more than the burst
        stats = sb.stats()
        assert stats["attempts_by_status"] == {200: 8, 429: 5}
        assert stats["rate_limited"] == {"requests": 5}


def test_rpm_burst_defaults_to_one_second_of_requests(clock):
    with Sandbox(rpm=600, clock=clock) as sb, requests.Session() as session:
        statuses = [post(sb, "/chat/completions", chat(), session).status_code for _ in range(12)]
        assert statuses.count(200) == 10
    with Sandbox(rpm=6, clock=clock) as sb, requests.Session() as session:
        statuses = [post(sb, "/chat/completions", chat(), session).status_code for _ in range(3)]
        assert statuses == [200, 429, 429]  # at least 1


def test_rps_limits_per_second(clock):
    with Sandbox(rps=20, burst=20, clock=clock) as sb, requests.Session() as session:
        statuses = [post(sb, "/chat/completions", chat(), session).status_code for _ in range(25)]
        assert statuses == [200] * 20 + [429] * 5
        refused = post(sb, "/chat/completions", chat(), session)
        assert refused.headers["x-ratelimit-limit-requests"] == "1200"
        assert refused.headers["x-ratelimit-reset-requests"] == "50ms"
        clock.advance(0.05)
        assert post(sb, "/chat/completions", chat(), session).status_code == 200
        assert post(sb, "/chat/completions", chat(), session).status_code == 429


def test_tpm_charges_prompt_plus_max_tokens(clock):
    # 6000 tpm = 100 tokens a second in the bucket; this request costs 10 + 60 = 70.
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 40}],
               "max_tokens": 60}
    with Sandbox(tpm=6000, clock=clock) as sb, requests.Session() as session:
        first = post(sb, "/chat/completions", payload, session)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "6000"
        assert first.headers["x-ratelimit-remaining-tokens"] == "1800"  # 30% of the bucket
        refused = post(sb, "/chat/completions", payload, session)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
        assert refused.headers["x-ratelimit-reset-tokens"] == "400ms"
        assert refused.headers["Retry-After"] == "1"
        clock.advance(0.4)
        assert post(sb, "/chat/completions", payload, session).status_code == 200
        assert sb.stats()["rate_limited"] == {"tokens": 1}


def test_a_request_larger_than_the_token_bucket_waits_for_a_full_bucket(clock):
    # Costs 100 prompt + 102 answer tokens; the bucket holds 10 (600 tpm = 10 a second).
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 400}]}
    with Sandbox(tpm=600, clock=clock) as sb:
        assert post(sb, "/chat/completions", big).status_code == 200
        refused = post(sb, "/chat/completions", big)
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-reset-tokens"] == "20.2s"  # from -192 back to 10
        clock.advance(15)
        assert post(sb, "/chat/completions", big).status_code == 429  # still paying the debt
        clock.advance(5.2)
        assert post(sb, "/chat/completions", big).status_code == 200


@pytest.mark.parametrize("style, headers, hint", [
    ("seconds", {"Retry-After": "1"}, 1.0),
    ("ms", {"retry-after-ms": "500"}, 0.5),
    ("date", {"Retry-After": email.utils.formatdate(FakeClock().time() + 1, usegmt=True)}, 1.0),
    ("reset", {}, 0.5),
    ("none", {}, None),
])
def test_each_retry_after_style(clock, style, headers, hint):
    with Sandbox(rpm=120, burst=1, retry_after=style, clock=clock) as sb:
        assert post(sb, "/chat/completions", chat()).status_code == 200
        refused = post(sb, "/chat/completions", chat())
    assert refused.status_code == 429
    for name, value in headers.items():
        assert refused.headers[name] == value
    hinted = {name.lower() for name in ("Retry-After", "retry-after-ms")} & {
        name.lower() for name in refused.headers}
    assert hinted == {name.lower() for name in headers}
    if style == "none":
        assert "x-ratelimit-reset-requests" not in refused.headers
    else:
        assert refused.headers["x-ratelimit-reset-requests"] == "500ms"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert retry_after_s(refused.headers, clock.time()) == hint


@pytest.mark.parametrize("style, name, value", [
    ("seconds", "Retry-After", "3"), ("ms", "retry-after-ms", "2500"),
    ("reset", "x-ratelimit-reset-requests", "2.5s")])
def test_always_429_answers_every_call_with_the_chosen_hint(style, name, value):
    with Sandbox(always_429=True, retry_after=style, retry_after_value_s=2.5) as sb:
        for route, payload in (("/chat/completions", chat()),
                               ("/embeddings", {"model": "e", "input": "x"})):
            response = post(sb, route, payload)
            assert response.status_code == 429
            assert response.headers[name] == value
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert sb.stats()["rate_limited"] == {"always": 2}


def send_in_background(sb, results, payload=None):
    def send():
        conn = connect(sb)
        try:
            response = raw_post(conn, "/chat/completions", payload or chat())
            results.append(response.status)
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            results.append(type(exc).__name__)
        finally:
            conn.close()
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_max_in_flight_refuses_the_request_beyond_the_cap():
    sb = Sandbox(max_in_flight=2, latency_s=60)  # answers only when stop() cuts them
    sb.start()
    try:
        results: list = []
        threads = [send_in_background(sb, results) for _ in range(2)]
        assert wait_until(lambda: sb.stats()["in_flight"] == 2, TIMEOUT)
        refused = post(sb, "/chat/completions", chat())
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "requests"
        assert "concurrent" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"] == "60"  # the latency: when a slot frees up
        stats = sb.stats()
        assert stats["rate_limited"] == {"in_flight": 1}
        assert stats["max_in_flight_seen"] == 3
        assert stats["max_in_flight_seen_by_model"] == {MODEL: 3}
    finally:
        sb.stop()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert len(results) == 2 and 200 not in results
    assert sb.stats()["attempts_by_status"] == {429: 1, "aborted": 2}


# -- limit shapes: windows, own tokenizer, header families, gateway wordings ------------------


def codes(answers):
    return [answer.status_code for answer in answers]


def test_first_request_window_admits_n_then_reopens_w_after_its_first_request(clock):
    clock.advance(3.5)  # the window follows the first request, not the clock's minute
    with Sandbox(window_requests=3, window_s=10, clock=clock) as sb, \
            requests.Session() as session:
        answers = [post(sb, "/chat/completions", chat(), session) for _ in range(3)]
        assert codes(answers) == [200, 200, 200]
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
        assert {a.headers["x-ratelimit-limit-requests"] for a in answers} == {"3"}
        assert answers[0].headers["x-ratelimit-reset-requests"] == "10s"
        clock.advance(4)
        refused = post(sb, "/chat/completions", chat(), session)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert refused.headers["Retry-After"] == "6"  # the time left in the window
        assert refused.headers["x-ratelimit-reset-requests"] == "6s"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        clock.advance(5.5)
        late = post(sb, "/chat/completions", chat(), session)
        assert late.status_code == 429 and late.headers["Retry-After"] == "1"
        assert late.headers["x-ratelimit-reset-requests"] == "500ms"
        # Another model has its own window.
        assert post(sb, "/chat/completions", chat(model="other"), session).status_code == 200
        clock.advance(0.5)  # exactly W after the window's first request: all of it is back
        reopened = [post(sb, "/chat/completions", chat(), session) for _ in range(3)]
        assert codes(reopened) == [200, 200, 200]
        assert reopened[0].headers["x-ratelimit-remaining-requests"] == "2"
        assert reopened[0].headers["x-ratelimit-reset-requests"] == "10s"
        clock.advance(9.5)
        assert post(sb, "/chat/completions", chat(), session).status_code == 429
        clock.advance(30)  # quiet: the next window opens with the next request
        quiet = post(sb, "/chat/completions", chat(), session)
        assert quiet.status_code == 200 and quiet.headers["x-ratelimit-reset-requests"] == "10s"
        stats = sb.stats()
        assert stats["rate_limited"] == {"window": 3}
        assert stats["attempts_by_status"] == {200: 8, 429: 3}


def test_clock_windows_reopen_at_the_boundary_and_can_hint_nothing(clock):
    clock.advance(45)
    assert clock.time() % 60 == 45  # 45 s into a calendar minute
    with Sandbox(window_requests=2, window_s=60, window_align="clock",
                 window_retry_after="none", clock=clock) as sb, requests.Session() as session:
        answers = [post(sb, "/chat/completions", chat(), session) for _ in range(3)]
        assert codes(answers) == [200, 200, 429]
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0", "0"]
        for answer in answers:  # no reset on any answer, no hint on the 429
            assert answer.headers["x-ratelimit-limit-requests"] == "2"
            assert not [name for name in answer.headers if "reset" in name.lower()]
        refused = answers[2]
        assert "Retry-After" not in refused.headers and "retry-after-ms" not in refused.headers
        assert retry_after_s(refused.headers, clock.time()) is None
        assert "try again later" in refused.json()["error"]["message"]
        clock.advance(14.5)
        assert post(sb, "/chat/completions", chat(), session).status_code == 429
        clock.advance(0.5)  # the minute rolls over
        rolled = post(sb, "/chat/completions", chat(), session)
        assert rolled.status_code == 200
        assert rolled.headers["x-ratelimit-remaining-requests"] == "1"
        assert sb.stats()["rate_limited"] == {"window": 2}
    clock.advance(20)
    with Sandbox(window_requests=1, window_s=60, window_align="clock", clock=clock) as sb:
        first = post(sb, "/chat/completions", chat())
        assert first.headers["x-ratelimit-reset-requests"] == "40s"  # to the boundary, not 60
        refused = post(sb, "/chat/completions", chat())
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "40"


@pytest.mark.parametrize("shape, style, name, value", [
    ("window", "seconds", "Retry-After", "10"),
    ("window", "ms", "retry-after-ms", "10000"),
    ("window", "reset", "x-ratelimit-reset-requests", "10s"),
    ("left", "ms", "retry-after-ms", "2500"),
    ("left", "date", "Retry-After",
     email.utils.formatdate(FakeClock().time() + 10, usegmt=True)),
])
def test_window_hints_in_each_retry_after_style(clock, shape, style, name, value):
    with Sandbox(window_requests=1, window_s=10, window_retry_after=shape, retry_after=style,
                 clock=clock) as sb:
        assert post(sb, "/chat/completions", chat()).status_code == 200
        clock.advance(7.5)
        refused = post(sb, "/chat/completions", chat())
    assert refused.status_code == 429
    assert refused.headers[name] == value
    if style != "reset":  # the headers tell the truth whatever the hint says
        assert refused.headers["x-ratelimit-reset-requests"] == "2.5s"


def test_a_window_combines_with_a_token_bucket_and_a_refusal_uses_no_slot(clock):
    # Costs 10 + 60 = 70 tokens of a 100-token bucket (6000 tpm).
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 40}],
               "max_tokens": 60}
    with Sandbox(window_requests=5, window_s=60, tpm=6000, clock=clock) as sb:
        assert post(sb, "/chat/completions", payload).status_code == 200
        refused = post(sb, "/chat/completions", payload)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
        assert refused.headers["x-ratelimit-remaining-requests"] == "4"  # not charged
        assert refused.headers["x-ratelimit-reset-tokens"] == "400ms"
        assert sb.stats()["rate_limited"] == {"tokens": 1}
        # A refused request does not open the next window; the first admitted one does.
        clock.advance(59.5)
        big = {**payload, "max_tokens": 500}  # 510 tokens: the bucket goes 410 into debt
        assert post(sb, "/chat/completions", big).status_code == 200
        clock.advance(0.5)  # the first window is over
        refused = post(sb, "/chat/completions", payload)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
        assert refused.headers["x-ratelimit-remaining-requests"] == "5"
        assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"  # not yet opened
        clock.advance(20)
        opened = post(sb, "/chat/completions", payload)
        assert opened.status_code == 200
        assert opened.headers["x-ratelimit-remaining-requests"] == "4"
        assert opened.headers["x-ratelimit-reset-requests"] == "1m0s"  # opened just now


def test_token_ratio_shows_in_usage_and_in_the_charge(clock):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 40}],
               "max_tokens": 60}
    with Sandbox(tpm=6000, token_ratio=1.5, clock=clock) as sb:
        first = post(sb, "/chat/completions", payload)
        assert first.json()["usage"]["prompt_tokens"] == 15  # 10 estimated x 1.5
        assert first.json()["usage"]["completion_tokens"] == 12  # the answer is not rescaled
        # Charged 15 + 60 of 100: 25 % of 6000 left (70 -> 1800 with the plain estimate).
        assert first.headers["x-ratelimit-remaining-tokens"] == "1500"
        clock.advance(1)
        streamed = post(sb, "/chat/completions", {**payload, "stream": True,
                                                  "stream_options": {"include_usage": True}})
        usage = json.loads(sse_events(streamed.content)[-2])["usage"]
        assert usage["prompt_tokens"] == 15
        clock.advance(1)
        embedded = post(sb, "/embeddings", {"model": "e", "input": ["x" * 40, [1, 2, 3]]})
        assert embedded.json()["usage"]["prompt_tokens"] == 15 + 3  # token arrays are exact
    with Sandbox(token_ratio=1.3) as sb:  # no limit needed to learn the ratio from usage
        usage = post(sb, "/chat/completions", chat("x" * 36)).json()["usage"]
        assert usage["prompt_tokens"] == 15  # "be brief" + 36 chars = 11 tokens -> 14.3 -> 15


def test_tpm_as_a_fixed_token_window(clock):
    # 190 prompt + 60 max_tokens = 250 tokens a request.
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 760}],
               "max_tokens": 60}
    with Sandbox(tpm=600, token_window_s=60, clock=clock) as sb, requests.Session() as session:
        answers = [post(sb, "/chat/completions", payload, session) for _ in range(2)]
        assert codes(answers) == [200, 200]
        assert [a.headers["x-ratelimit-remaining-tokens"] for a in answers] == ["350", "100"]
        assert answers[0].headers["x-ratelimit-limit-tokens"] == "600"
        assert answers[0].headers["x-ratelimit-reset-tokens"] == "1m0s"
        clock.advance(20)
        refused = post(sb, "/chat/completions", payload, session)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
        assert refused.headers["Retry-After"] == "40"
        assert refused.headers["x-ratelimit-reset-tokens"] == "40s"
        clock.advance(40)
        again = post(sb, "/chat/completions", payload, session)
        assert again.status_code == 200 and again.headers["x-ratelimit-remaining-tokens"] == "350"
        assert sb.stats()["rate_limited"] == {"tokens": 1}
    with Sandbox(tpm=600, token_window_s=30, clock=clock) as sb:  # half a minute's tokens
        first = post(sb, "/chat/completions", payload)
        assert first.headers["x-ratelimit-limit-tokens"] == "300"
        assert post(sb, "/chat/completions", payload).status_code == 429


@pytest.mark.parametrize("limits, limit, remaining", [
    ({"rpm": 60, "burst": 2}, "60", "30"),  # a bucket's fill as a share of the minute's limit
    ({"window_requests": 2, "window_s": 60}, "2", "1"),
])
def test_litellm_headers_name_the_api_key_descriptor_and_carry_no_reset(clock, limits, limit,
                                                                         remaining):
    with Sandbox(**limits, tpm=6000, ratelimit_headers="litellm", clock=clock) as sb, \
            requests.Session() as session:
        answers = [post(sb, "/chat/completions", chat(), session) for _ in range(3)]
    assert codes(answers) == [200, 200, 429]
    ok, refused = answers[0], answers[2]
    assert ok.headers["x-ratelimit-api_key-limit-requests"] == limit
    assert ok.headers["x-ratelimit-api_key-remaining-requests"] == remaining
    assert ok.headers["x-ratelimit-api_key-limit-tokens"] == "6000"
    assert ok.headers["x-ratelimit-api_key-remaining-tokens"] == "5400"  # 10 of 100 charged
    assert refused.headers["x-ratelimit-api_key-remaining-requests"] == "0"
    assert refused.headers["Retry-After"]
    for answer in answers:
        names = [name.lower() for name in answer.headers]
        assert not [n for n in names if "reset" in n or n.startswith("x-ratelimit-limit-")]


@pytest.mark.parametrize("limits, limit, remaining, reset", [
    # The fake clock's time() is 2023-11-14T22:30:00Z; a half-full bucket refills in 1 s.
    ({"rpm": 60, "burst": 2}, "60", "30", "2023-11-14T22:30:01Z"),
    ({"window_requests": 2, "window_s": 60}, "2", "1", "2023-11-14T22:31:00Z"),
])
def test_anthropic_headers_reset_as_rfc3339_timestamps(clock, limits, limit, remaining, reset):
    with Sandbox(**limits, tpm=6000, ratelimit_headers="anthropic", clock=clock) as sb:
        ok = post(sb, "/chat/completions", chat())
    assert ok.headers["anthropic-ratelimit-requests-limit"] == limit
    assert ok.headers["anthropic-ratelimit-requests-remaining"] == remaining
    assert ok.headers["anthropic-ratelimit-requests-reset"] == reset
    for side in ("tokens", "input-tokens"):  # one token limit, charged with the prompt
        assert ok.headers[f"anthropic-ratelimit-{side}-limit"] == "6000"
        assert ok.headers[f"anthropic-ratelimit-{side}-remaining"] == "5400"
        assert ok.headers[f"anthropic-ratelimit-{side}-reset"] == "2023-11-14T22:30:01Z"
    assert not [name for name in ok.headers if name.lower().startswith("x-ratelimit")]


@pytest.mark.parametrize("limits", [{"rpm": 60, "burst": 1, "tpm": 6000},
                                    {"window_requests": 1}])
def test_no_ratelimit_headers_leaves_only_the_retry_hint(clock, limits):
    with Sandbox(**limits, ratelimit_headers="none", clock=clock) as sb:
        ok = post(sb, "/chat/completions", chat())
        refused = post(sb, "/chat/completions", chat())
    assert (ok.status_code, refused.status_code) == (200, 429)
    for answer in (ok, refused):
        assert not [name for name in answer.headers if "ratelimit" in name.lower()]
    assert refused.headers["Retry-After"] in ("1", "60")


@pytest.mark.parametrize("extra, hint", [({"in_flight_retry_after_s": 10}, "10"), ({}, "60")])
def test_litellm_in_flight_style_words_the_cap_as_litellm_with_an_inflated_hint(extra, hint):
    sb = Sandbox(max_in_flight=1, latency_s=30, in_flight_style="litellm", **extra)
    sb.start()
    try:
        results: list = []
        thread = send_in_background(sb, results)
        assert wait_until(lambda: sb.stats()["in_flight"] == 1, TIMEOUT)
        refused = post(sb, "/chat/completions", chat())
        assert refused.status_code == 429
        message = refused.json()["error"]["message"]
        assert "Max parallel request limit reached" in message
        assert "rate_limit_type: max_parallel_requests" in message
        assert refused.headers["Retry-After"] == hint  # not the latency, when a slot frees
        assert sb.stats()["rate_limited"] == {"in_flight": 1}
    finally:
        sb.stop()
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def test_new_api_overload_style_words_bucket_429s_as_quota_that_says_try_later(clock):
    with Sandbox(rpm=60, burst=1, overload_style="new-api", clock=clock) as sb:
        assert post(sb, "/chat/completions", chat()).status_code == 200
        refused = post(sb, "/chat/completions", chat())
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert error["message"] == "upstream saturated, please try again later"
    assert refused.headers["Retry-After"] == "1"


@pytest.mark.parametrize("kwargs, named", [
    ({"window_requests": 0}, "window_requests"),
    ({"window_requests": 2.5}, "window_requests"),
    ({"window_requests": True}, "window_requests"),
    ({"window_requests": 5, "rpm": 60}, "window_requests"),
    ({"window_requests": 5, "rps": 1}, "window_requests"),
    ({"window_requests": 5, "window_s": 0}, "window_s"),
    ({"window_s": 10}, "window_s"),
    ({"window_requests": 5, "window_align": "hour"}, "window_align"),
    ({"window_align": "clock"}, "window_align"),
    ({"window_requests": 5, "window_retry_after": "never"}, "window_retry_after"),
    ({"window_retry_after": "window"}, "window_retry_after"),
    ({"token_ratio": 0}, "token_ratio"),
    ({"token_ratio": float("nan")}, "token_ratio"),
    ({"token_ratio": "1.3"}, "token_ratio"),
    ({"token_ratio": None}, "token_ratio"),
    ({"token_window_s": 60}, "token_window_s"),
    ({"tpm": 600, "token_window_s": -1}, "token_window_s"),
    ({"ratelimit_headers": "x-ratelimit"}, "ratelimit_headers"),
    ({"max_in_flight": 2, "in_flight_style": "nginx"}, "in_flight_style"),
    ({"in_flight_style": "litellm"}, "in_flight_style"),
    ({"in_flight_retry_after_s": 10}, "in_flight_retry_after_s"),
    ({"max_in_flight": 1, "in_flight_retry_after_s": float("inf")}, "in_flight_retry_after_s"),
    ({"overload_style": "new-api"}, "overload_style"),
    ({"tpm": 600, "token_window_s": 60, "overload_style": "new-api"}, "overload_style"),
    ({"rpm": 60, "overload_style": "gateway"}, "overload_style"),
])
def test_limit_shape_arguments_are_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=named):
        Sandbox(**kwargs)


# -- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "502", "503", "504"])
def test_server_error_faults_answer_json_with_their_status(kind):
    with Sandbox(faults={kind: 1.0}) as sb, requests.Session() as session:
        response = post(sb, "/chat/completions", chat(), session)
        assert response.status_code == int(kind)
        assert response.json()["error"]["type"] == "server_error"
        assert response.headers["x-request-id"]
        post(sb, "/chat/completions", chat(), session)
        assert sb.stats()["connections_accepted"] == 1
        assert sb.stats()["faults_injected"] == {kind: 2}


def test_html502_fault_is_an_html_page():
    with Sandbox(faults={"html502": 1.0}) as sb:
        response = post(sb, "/chat/completions", chat())
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "text/html"
    assert "<title>502 Bad Gateway</title>" in response.text


def test_quota_fault_is_a_429_without_a_retry_hint():
    with Sandbox(faults={"quota": 1.0}) as sb:
        response = post(sb, "/chat/completions", chat())
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "insufficient_quota"
    assert response.json()["error"]["type"] == "insufficient_quota"
    assert retry_after_s(response.headers, 0.0) is None


def test_invalid_json_fault_is_a_200_that_does_not_parse():
    with Sandbox(faults={"invalid_json": 1.0}) as sb:
        response = post(sb, "/chat/completions", chat())
        assert response.status_code == 200
        with pytest.raises(ValueError):
            json.loads(response.content)
        stream = post(sb, "/chat/completions", chat(stream=True))
        events = sse_events(stream.content)
        with pytest.raises(ValueError):
            json.loads(events[0])
        assert events[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_truncated_fault_promises_more_than_it_sends(stream):
    with Sandbox(faults={"truncated": 1.0}) as sb:
        conn = connect(sb)
        response = raw_post(conn, "/chat/completions", chat(stream=stream))
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
        conn.close()
        assert sb.stats()["attempts_by_status"] == {"truncated": 1}


def test_reset_fault_resets_the_connection_without_an_answer():
    with Sandbox(faults={"reset": 1.0}) as sb:
        conn = connect(sb)
        with pytest.raises(ConnectionResetError):
            raw_post(conn, "/chat/completions", chat())
        conn.close()
        with pytest.raises(requests.ConnectionError):
            post(sb, "/chat/completions", chat())
        assert sb.stats()["attempts_by_status"] == {"reset": 2}


def test_slow_fault_answers_late_and_stop_interrupts_it():
    with Sandbox(faults={"slow": 1.0}, slow_s=0.01) as sb:
        assert post(sb, "/chat/completions", chat()).status_code == 200
        assert sb.stats()["faults_injected"] == {"slow": 1}
    sb = Sandbox(faults={"slow": 1.0}, slow_s=120)
    sb.start()
    results: list = []
    thread = send_in_background(sb, results)
    # the fault is drawn once the request is read: from then on the answer is being delayed
    # (in_flight counts it from its first byte, when stopping would cut its body short)
    assert wait_until(lambda: sb.stats()["faults_injected"] == {"slow": 1}, TIMEOUT)
    sb.stop()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "stop() did not interrupt the slow answer"
    assert results and results[0] != 200
    assert sb.stats()["attempts_by_status"] == {"aborted": 1}


def statuses_of(sb, count):
    out = []
    with requests.Session() as session:
        for _ in range(count):
            try:
                out.append(post(sb, "/chat/completions", chat(), session).status_code)
            except requests.ConnectionError:
                out.append("reset")
    return out


def test_seeded_faults_repeat_and_default_kinds_are_500_502_503_reset():
    with Sandbox(fault_rate=0.5, seed=7) as a:
        first = statuses_of(a, 40)
    with Sandbox(fault_rate=0.5, seed=7) as b:
        second = statuses_of(b, 40)
    assert first == second
    assert 200 in first and set(first) - {200}
    assert set(first) <= {200, 500, 502, 503, "reset"}
    with Sandbox(fault_rate=1.0, seed=1) as sb:
        seen = statuses_of(sb, 60)
        assert 200 not in seen
        assert set(seen) == {500, 502, 503, "reset"}
        assert sum(sb.stats()["faults_injected"].values()) == 60


def test_fault_kinds_spread_the_rate_and_mappings_give_exact_odds():
    plan = FaultPlan(0.2, ["500", 503])
    assert plan.probabilities == pytest.approx({"500": 0.1, "503": 0.1})
    assert [plan.pick(x) for x in (0.05, 0.15, 0.25)] == ["500", "503", None]
    assert not FaultPlan()
    assert FaultPlan(faults={"reset": 0.3}).pick(0.29) == "reset"
    for bad in (lambda: FaultPlan(0.1, ["teapot"]), lambda: FaultPlan(1.5),
                lambda: FaultPlan(faults={"500": 0.7, "502": 0.7}),
                lambda: FaultPlan(0.1, {"500": 0.1})):
        with pytest.raises(ValueError):
            bad()
    assert parse_faults("500, reset") == ["500", "reset"]
    assert parse_faults("500=0.01,slow=0.5") == {"500": 0.01, "slow": 0.5}
    with pytest.raises(ValueError):
        parse_faults("500=lots")


# -- counters, keep-alive, lifecycle ----------------------------------------------------------


def test_a_session_reuses_one_connection_and_counters_reset(sandbox):
    with requests.Session() as session:
        for _ in range(5):
            assert post(sandbox, "/chat/completions", chat(), session).status_code == 200
        post(sandbox, "/embeddings", {"model": "e", "input": "x"}, session)
    stats = sandbox.stats()
    assert stats["connections_accepted"] == 1
    assert stats["attempts"] == 6
    assert stats["attempts_by_status"] == {200: 6}
    assert stats["requests_by_model"] == {MODEL: 5, "e": 1}
    assert stats["max_in_flight_seen"] == 1 and stats["in_flight"] == 0
    sandbox.reset_stats()
    assert sandbox.stats()["attempts"] == 0 and sandbox.stats()["attempts_by_status"] == {}
    # Without a session every call opens its own connection.
    for _ in range(3):
        post(sandbox, "/chat/completions", chat())
    assert sandbox.stats()["connections_accepted"] == 3


def test_stats_endpoint_serves_the_counters_without_counting_itself(sandbox):
    post(sandbox, "/chat/completions", chat())
    root = sandbox.base_url[: -len("/v1")]
    served = requests.get(root + "/_sandbox/stats", timeout=TIMEOUT).json()
    assert served["attempts"] == 1 and served["attempts_by_status"] == {"200": 1}
    assert requests.post(root + "/_sandbox/reset", timeout=TIMEOUT).status_code == 200
    assert sandbox.stats()["attempts"] == 0


def test_concurrent_requests_are_counted():
    results: list = []
    with Sandbox(latency_s=60) as sb:
        threads = [send_in_background(sb, results, chat(model=f"m{i % 2}")) for i in range(4)]
        assert wait_until(lambda: sb.stats()["in_flight"] == 4, TIMEOUT)
        stats = sb.stats()
        assert stats["max_in_flight_seen"] == 4
        assert stats["max_in_flight_seen_by_model"] == {"m0": 2, "m1": 2}
        assert stats["connections_accepted"] == 4
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def test_latency_delays_answers_and_stop_closes_idle_keep_alive_connections():
    with Sandbox(latency_s=0.01) as sb:
        conn = connect(sb)
        assert raw_post(conn, "/chat/completions", chat()).read()
        address = sb.address
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=TIMEOUT).close()
    with pytest.raises((OSError, http.client.HTTPException)):
        raw_post(conn, "/chat/completions", chat())
    conn.close()


def test_lifecycle_errors_and_argument_validation():
    sb = Sandbox()
    with pytest.raises(RuntimeError):
        sb.base_url  # noqa: B018 - the property raises
    sb.start()
    with pytest.raises(RuntimeError):
        sb.start()
    assert sb.base_url.startswith("http://127.0.0.1:") and sb.base_url.endswith("/v1")
    sb.stop()
    sb.stop()  # idempotent
    for kwargs in ({"rpm": 0}, {"rpm": 60, "rps": 1}, {"burst": 3}, {"retry_after": "later"},
                   {"latency_s": -1}, {"api_key": ""}, {"faults": ["nope"]}, {"rpm": "60"},
                   {"latency_s": "1"}, {"max_in_flight": 2.5}, {"tpm": float("inf")}):
        with pytest.raises(ValueError):  # never a TypeError from comparing a string
            Sandbox(**kwargs)


def test_go_durations():
    assert [go_duration(s) for s in (0, 0.0004, 0.25, 1, 1.5, 59.9991, 61, 3725)] == [
        "0s", "1ms", "250ms", "1s", "1.5s", "1m0s", "1m1s", "1h2m5s"]


# -- command line and the process ----------------------------------------------------------


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_options_map_to_sandbox_arguments(monkeypatch):
    monkeypatch.setenv("SANDBOX_KEY_FOR_TEST", "sk-env")
    args = parse("--port", "0", "--rpm", "600", "--latency", "50ms", "--fault-rate", "0.02",
                 "--seed", "3", "--retry-after", "ms", "--max-in-flight", "4",
                 "--faults", "500,reset", "--api-key-env", "SANDBOX_KEY_FOR_TEST")
    assert sandbox_kwargs(args) == {
        "port": 0, "rpm": 600.0, "latency_s": 0.05, "fault_rate": 0.02, "seed": 3,
        "retry_after": "ms", "max_in_flight": 4, "faults": ["500", "reset"], "api_key": "sk-env"}
    assert sandbox_kwargs(parse()) == {"port": 8000}
    for bad in (["--latency", "soon"], ["--rpm", "-1"], ["--fault-rate", "2"],
                ["--retry-after", "later"], ["--faults", "teapot"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_every_sandbox_argument_has_a_flag_that_round_trips_and_is_documented():
    kwargs = {"port": 0, "host": "127.0.0.1", "rpm": 90.5, "tpm": 1000, "burst": 2,
              "max_in_flight": 3, "latency_s": 0.05, "faults": {"500": 0.1, "slow": 0.2},
              "seed": 9, "retry_after": "date", "models": ["a", "b"], "always_429": True,
              "retry_after_value_s": 2.5, "slow_s": 0.5}
    # Windows exclude rpm, so the limit shapes make a second valid set.
    shapes = {"port": 0, "window_requests": 5, "window_s": 10.0, "window_align": "clock",
              "window_retry_after": "window", "tpm": 4000, "token_window_s": 60.0,
              "token_ratio": 1.3, "ratelimit_headers": "anthropic", "max_in_flight": 2,
              "in_flight_style": "litellm", "in_flight_retry_after_s": 10.0}
    kwargs.update(overload_style="new-api")
    params = set(inspect.signature(Sandbox).parameters) - {"clock", "api_key"}
    # Exclusive with rpm / with the faults mapping.
    assert params - set(kwargs) - set(shapes) == {"rps", "fault_rate"}
    for given in (kwargs, shapes):
        assert sandbox_kwargs(parse(*to_argv(**given))) == given
        Sandbox(**given)  # and they are valid together
    assert sandbox_kwargs(parse(*to_argv(rps=20, fault_rate=0.1))) == {
        "port": 8000, "rps": 20, "fault_rate": 0.1}
    with pytest.raises(TypeError):
        to_argv(clock=FakeClock())
    docs = (ROOT / "docs" / "sandbox.md").read_text(encoding="utf-8")
    every = {**kwargs, **shapes, "rps": 1, "fault_rate": 0.1}
    flags = [a for a in to_argv(**every) if a.startswith("--")]
    for flag in [*flags, "--api-key-env", "--port"]:
        assert f"`{flag}" in docs, f"{flag} is not documented in docs/sandbox.md"
    for kind in FAULT_KINDS:
        assert f"`{kind}`" in docs, f"fault {kind} is not documented"


def test_limit_shape_flags_parse_and_reach_the_server(capsys):
    args = parse("--window-requests", "10", "--window", "10s", "--window-align", "clock",
                 "--window-retry-after", "window", "--token-ratio", "1.3", "--tpm", "40000",
                 "--token-window", "60s", "--ratelimit-headers", "litellm",
                 "--max-in-flight", "4", "--in-flight-style", "litellm",
                 "--in-flight-retry-after", "10s")
    kwargs = sandbox_kwargs(args)
    assert kwargs == {
        "port": 8000, "window_requests": 10, "window_s": 10.0, "window_align": "clock",
        "window_retry_after": "window", "token_ratio": 1.3, "tpm": 40000.0,
        "token_window_s": 60.0, "ratelimit_headers": "litellm", "max_in_flight": 4,
        "in_flight_style": "litellm", "in_flight_retry_after_s": 10.0}
    description = Sandbox(**{**kwargs, "port": 0}).describe()
    for part in ("window_requests=10", "window_s=10", "window_align=clock",
                 "window_retry_after=window", "token_ratio=1.3", "token_window_s=60",
                 "ratelimit_headers=litellm", "in_flight_style=litellm",
                 "in_flight_retry_after_s=10"):
        assert part in description
    assert sandbox_kwargs(parse("--rpm", "60", "--overload-style", "new-api"))[
        "overload_style"] == "new-api"
    for bad in (["--window-align", "hour"], ["--window-retry-after", "soon"],
                ["--ratelimit-headers", "x"], ["--token-ratio", "0"], ["--window-requests", "1.5"],
                ["--in-flight-style", "nginx"], ["--overload-style", "x"], ["--window", "soon"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    capsys.readouterr()
    assert run(parse("--port", "0", "--window", "10s")) == 2  # a window needs its requests
    assert "window_s needs window_requests" in capsys.readouterr().err


def test_sandbox_process_passes_the_limit_shapes_on():
    with SandboxProcess(window_requests=2, window_s=60, window_retry_after="window",
                        ratelimit_headers="litellm", token_ratio=2.0) as sb, \
            requests.Session() as session:
        answers = [post(sb, "/chat/completions", chat(), session) for _ in range(3)]
        assert codes(answers) == [200, 200, 429]
        assert answers[0].json()["usage"]["prompt_tokens"] == 10  # 5 estimated x 2
        assert answers[0].headers["x-ratelimit-api_key-remaining-requests"] == "1"
        assert answers[2].headers["Retry-After"] == "60"  # the window, not the time left
        assert sb.stats()["rate_limited"] == {"window": 1}


def test_run_refuses_an_unset_api_key_variable(monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_SANDBOX_KEY", raising=False)
    assert run(parse("--port", "0", "--api-key-env", "NO_SUCH_SANDBOX_KEY")) == 2
    assert "NO_SUCH_SANDBOX_KEY" in capsys.readouterr().err


def test_sandbox_process_serves_from_a_child_and_stops_cleanly():
    sandbox = SandboxProcess(rpm=600, api_key="sk-child", seed=1)
    with sandbox as sb:
        assert sb.pid is not None
        ok = post(sb, "/chat/completions", chat("from parent"), Authorization="Bearer sk-child")
        assert ok.json()["choices"][0]["message"]["content"] == "echo: from parent"
        assert ok.headers["x-ratelimit-limit-requests"] == "600"
        assert post(sb, "/chat/completions", chat()).status_code == 401
        stats = sb.stats()
        assert stats["attempts_by_status"] == {200: 1, 401: 1}
        assert stats["requests_by_model"] == {MODEL: 1}
        sb.reset_stats()
        assert sb.stats()["attempts"] == 0
        url = sb.base_url
        assert sb.stop() == 0  # SIGTERM is a clean stop
    assert sandbox.stop() is None  # already stopped
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/models", timeout=TIMEOUT)


def test_sandbox_process_reports_a_failed_start():
    with pytest.raises(RuntimeError, match="rps"):
        SandboxProcess(rpm=60, rps=1).start()


# -- pytest fixtures ----------------------------------------------------------------------------


def test_fixture_serves_a_default_sandbox(cometkit_sandbox):
    assert post(cometkit_sandbox, "/chat/completions", chat()).status_code == 200
    assert cometkit_sandbox.stats()["attempts"] == 1


def test_factory_fixture_builds_sandboxes_with_arguments(cometkit_sandbox_factory):
    locked = cometkit_sandbox_factory(api_key="sk-f")
    limited = cometkit_sandbox_factory(always_429=True)
    assert post(locked, "/chat/completions", chat()).status_code == 401
    assert post(limited, "/chat/completions", chat()).status_code == 429
    assert locked.base_url != limited.base_url


def test_factory_fixture_stops_its_sandboxes_after_the_test(pytester):
    ports = pytester.path / "ports.txt"
    # A bare checkout has no pytest11 entry point to load the fixtures by (conftest.py puts
    # the checkout on PYTHONPATH for subprocesses).
    extra = () if installed() else ("-p", "cometkit.sandbox.pytest_plugin")
    pytester.makepyfile(f"""
        import requests

        def test_uses_both(cometkit_sandbox, cometkit_sandbox_factory):
            made = cometkit_sandbox_factory(rpm=60)
            for sb in (cometkit_sandbox, made):
                r = requests.get(sb.base_url + "/models", timeout=10)
                assert r.status_code == 200
            with open({str(ports)!r}, "w") as f:
                f.write(" ".join(str(sb.address[1]) for sb in (cometkit_sandbox, made)))
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *extra, timeout=120)
    result.assert_outcomes(passed=1)
    for port in ports.read_text().split():
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=TIMEOUT).close()


# -------------------------------------------------------------------------------------------
# Tool calls and structured output
# -------------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "f"]},
        "days": {"type": "integer"}}}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}}}}


def test_tools_get_a_deterministic_tool_call(sandbox):
    response = post(sandbox, "/chat/completions", chat("Paris", tools=[WEATHER_TOOL, CLOCK_TOOL]))
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_sandbox_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius",
                                                         "days": 5}
    named = post(sandbox, "/chat/completions", chat("x", tools=[WEATHER_TOOL, CLOCK_TOOL],
                 tool_choice={"type": "function", "function": {"name": "get_time"}})).json()
    function = named["choices"][0]["message"]["tool_calls"][0]["function"]
    assert function == {"name": "get_time", "arguments": '{"utc": true}'}


def test_a_tool_result_is_answered_with_text_and_none_never_calls(sandbox):
    messages = [{"role": "user", "content": "Paris"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    answer = post(sandbox, "/chat/completions", {"model": MODEL, "messages": messages,
                                                 "tools": [WEATHER_TOOL]}).json()
    assert answer["choices"][0]["message"]["content"] == "echo: sunny, 21 C"
    assert answer["choices"][0]["finish_reason"] == "stop"
    never = post(sandbox, "/chat/completions", chat("x", tools=[WEATHER_TOOL],
                                                    tool_choice="none")).json()
    assert never["choices"][0]["message"]["content"] == "echo: x"
    again = post(sandbox, "/chat/completions", {"model": MODEL, "messages": messages,
                                                "tools": [WEATHER_TOOL],
                                                "tool_choice": "required"}).json()
    assert again["choices"][0]["finish_reason"] == "tool_calls"


def test_a_streamed_tool_call_arrives_in_one_delta(sandbox):
    response = post(sandbox, "/chat/completions", chat("Rome", tools=[WEATHER_TOOL],
                                                       stream=True))
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    (call,) = chunks[0]["choices"][0]["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] == "Rome"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("extra,param", [
    ({"tools": []}, "tools"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
                                               "function": {"name": "nope"}}}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
])
def test_malformed_tools_and_formats_are_a_400(sandbox, extra, param):
    response = post(sandbox, "/chat/completions", chat("x", **extra))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_json_schema_and_json_object_answers_fit_the_request(sandbox):
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "score": {"type": "number"},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
        "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
        "$defs": {"Tag": {"type": "object", "properties": {"label": {"type": "string"}}}}}
    answer = post(sandbox, "/chat/completions", chat("abc", response_format={
        "type": "json_schema", "json_schema": {"name": "r", "schema": schema,
                                               "strict": True}})).json()
    content = json.loads(answer["choices"][0]["message"]["content"])
    assert content == {"name": "abc", "score": 3.0, "tags": [{"label": "abc"}], "maybe": 3}
    plain = post(sandbox, "/chat/completions", chat("abc", response_format={
        "type": "json_object"})).json()
    assert json.loads(plain["choices"][0]["message"]["content"]) == {"echo": "abc"}
