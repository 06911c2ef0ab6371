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
    assert wait_until(lambda: sb.stats()["in_flight"] == 1, TIMEOUT)
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
                   {"latency_s": -1}, {"api_key": ""}, {"faults": ["nope"]}):
        with pytest.raises(ValueError):
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
    params = set(inspect.signature(Sandbox).parameters) - {"clock", "api_key"}
    assert params - set(kwargs) == {"rps", "fault_rate"}  # exclusive with rpm / faults mapping
    assert sandbox_kwargs(parse(*to_argv(**kwargs))) == kwargs
    assert sandbox_kwargs(parse(*to_argv(rps=20, fault_rate=0.1))) == {
        "port": 8000, "rps": 20, "fault_rate": 0.1}
    Sandbox(**kwargs)  # and they are valid together
    with pytest.raises(TypeError):
        to_argv(clock=FakeClock())
    docs = (ROOT / "docs" / "sandbox.md").read_text(encoding="utf-8")
    flags = [a for a in to_argv(**kwargs, rps=1, fault_rate=0.1) if a.startswith("--")]
    for flag in [*flags, "--api-key-env", "--port"]:
        assert f"`{flag}" in docs, f"{flag} is not documented in docs/sandbox.md"
    for kind in FAULT_KINDS:
        assert f"`{kind}`" in docs, f"fault {kind} is not documented"


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
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)
    for port in ports.read_text().split():
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=TIMEOUT).close()
