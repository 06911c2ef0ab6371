"""The core client against a real loopback server: resources, streaming, errors, threads."""

from __future__ import annotations

import gc
import json
import logging
import socket
import threading
import time

import pytest
from scripted_server import Reply, ScriptedServer, chat_body, json_reply, wait_until

import cometkit
from cometkit import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)

KEY = "sk-test-SECRET-MARKER-4242"


@pytest.fixture
def no_plugins(monkeypatch):
    """A client with no plugins at all: the core alone."""
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "")


@pytest.fixture
def server():
    with ScriptedServer() as srv:
        yield srv


def make_client(srv, **kw):
    kw.setdefault("api_key", KEY)
    return cometkit.Client(base_url=srv.base_url, **kw)


class TestResources:
    def test_chat_completion_attribute_access(self, server, no_plugins):
        with make_client(server) as client:
            completion = client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "hello"}], temperature=0.5)
        assert completion.choices[0].message.content == "hi"
        assert completion.usage.total_tokens == 5
        assert completion.model == "m1"
        assert completion.id == "chatcmpl-1"
        assert completion.to_dict() == chat_body()
        sent = server.seen[0]
        assert sent.method == "POST" and sent.path == "/v1/chat/completions"
        assert sent.json() == {"model": "m1", "messages": [{"role": "user", "content": "hello"}],
                               "temperature": 0.5}
        assert sent.headers["Authorization"] == f"Bearer {KEY}"

    def test_provider_request_id_is_kept_on_the_answer(self, no_plugins):
        reply = json_reply(200, chat_body(), **{"x-request-id": "prov-123"})
        with ScriptedServer(lambda s: reply) as srv, make_client(srv) as client:
            completion = client.chat.completions.create(model="m1", messages=[])
        assert completion._request_id == "prov-123"

    def test_embeddings_models_and_raw_request(self, no_plugins):
        def handler(seen):
            if seen.path == "/v1/embeddings":
                return json_reply(200, {"object": "list", "data": [
                    {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "model": "e1", "usage": {"prompt_tokens": 2, "total_tokens": 2}})
            if seen.path == "/v1/models":
                return json_reply(200, {"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]})
            return json_reply(200, {"echo": seen.path, "method": seen.method})

        with ScriptedServer(handler) as srv, make_client(srv) as client:
            emb = client.embeddings.create(model="e1", input="abc")
            assert emb.data[0].embedding == [0.1, 0.2]
            models = client.models.list()
            assert [m.id for m in models.data] == ["m1", "m2"]
            other = client.request("DELETE", "files/abc", params={"x": "1"})
            assert other.echo == "/v1/files/abc?x=1" and other.method == "DELETE"

    def test_missing_attribute_reads_none_and_objects_are_read_only(self, server, no_plugins):
        with make_client(server) as client:
            completion = client.chat.completions.create(model="m1", messages=[])
        assert completion.system_fingerprint is None
        with pytest.raises(KeyError):
            completion["nope"]
        with pytest.raises(AttributeError):
            completion.model = "x"


class TestStreaming:
    EVENTS = [
        json.dumps({"id": "c", "model": "m1", "choices": [{"delta": {"content": "Hel"}}]}),
        json.dumps({"id": "c", "model": "m1", "choices": [{"delta": {"content": "lo"}}]}),
        json.dumps({"id": "c", "model": "m1", "choices": [],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}),
        "[DONE]",
    ]

    def stream_server(self):
        return ScriptedServer(lambda seen: Reply(200, events=self.EVENTS))

    def test_iterates_chunks_and_reads_usage(self, no_plugins):
        with self.stream_server() as srv, make_client(srv) as client:
            stream = client.chat.completions.create(model="m1", messages=[], stream=True)
            assert isinstance(stream, cometkit.Stream)
            text = "".join(c.choices[0].delta.content for c in stream if c.choices)
            assert text == "Hello"
            assert stream.usage.total_tokens == 6
            assert srv.seen[0].json()["stream"] is True

    @pytest.mark.parametrize("how", ["exhaust", "close", "context", "gc"])
    def test_stream_gives_back_its_limiter_slot(self, how, no_plugins):
        limiter = CountingLimiter()
        with self.stream_server() as srv, make_client(srv, extra_plugins=[limiter]) as client:
            stream = client.chat.completions.create(model="m1", messages=[], stream=True)
            assert limiter.held == 1
            if how == "exhaust":
                list(stream)
            elif how == "close":
                next(iter(stream))
                stream.close()
            elif how == "context":
                with stream:
                    next(iter(stream))
            else:
                del stream
                gc.collect()
            assert wait_until(lambda: limiter.held == 0)
            assert limiter.released == 1
            # the connection went back (or was dropped): a new call still works
            assert client.chat.completions.create(model="m1", messages=[], stream=True) \
                is not None


class CountingLimiter:
    """A test plugin: counts permits in use (also proves extra plugins are consulted)."""

    __name__ = "counting_limiter"

    def __init__(self):
        self.lock = threading.Lock()
        self.held = 0
        self.max_held = 0
        self.released = 0
        self.results = []

    @cometkit.hookimpl
    def cometkit_make_limiter(self, ctx):
        return self

    def acquire(self, request, timeout_s=None):
        with self.lock:
            self.held += 1
            self.max_held = max(self.max_held, self.held)
        return object()

    def release(self, permit, result):
        with self.lock:
            self.held -= 1
            self.released += 1
            self.results.append(result)

    def close(self):
        pass


STATUS_CLASSES = [
    (400, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError),
    (404, NotFoundError), (409, ConflictError), (422, UnprocessableEntityError),
    (429, RateLimitError), (500, InternalServerError), (503, InternalServerError),
    (418, APIStatusError),
]


class TestErrors:
    @pytest.mark.parametrize("status,cls", STATUS_CLASSES)
    def test_status_maps_to_typed_exception(self, status, cls, no_plugins):
        reply = json_reply(status, {"error": {"message": f"boom {status}", "type": "x",
                                              "code": "some_code"}}, **{"x-request-id": "req-77"})
        with ScriptedServer(lambda s: reply) as srv, make_client(srv) as client:
            with pytest.raises(cls) as info:
                client.chat.completions.create(model="m1", messages=[])
        err = info.value
        assert type(err) is cls
        assert err.status_code == status
        assert err.request_id == "req-77"
        assert err.code == "some_code"
        assert err.body["message"] == f"boom {status}"  # the inner error, as openai's
        assert err.response_body["error"]["message"] == f"boom {status}"
        assert err.response.status_code == status
        assert f"boom {status}" in str(err) and "req-77" in str(err)
        assert srv.count == 1  # no plugins: sent once

    def test_request_id_embedded_in_message_text(self, no_plugins):
        reply = json_reply(500, {"error": {"message": "upstream failed (request id: "
                                           "20251125ABCDEF123)", "type": "comet_api_error"}})
        with ScriptedServer(lambda s: reply) as srv, make_client(srv) as client:
            with pytest.raises(InternalServerError) as info:
                client.chat.completions.create(model="m1", messages=[])
        assert info.value.request_id == "20251125ABCDEF123"

    def test_html_page_is_explained(self, no_plugins):
        html = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body/></html>"
        reply = Reply(404, html, {"Content-Type": "text/html"})
        with ScriptedServer(lambda s: reply) as srv, make_client(srv) as client:
            with pytest.raises(NotFoundError) as info:
                client.request("GET", "/nope")
        assert "HTML" in str(info.value) and "404 Not Found" in str(info.value)
        assert "base_url" in str(info.value)

    def test_redirect_is_an_error_naming_the_target(self, no_plugins):
        reply = Reply(302, b"", {"Location": "https://www.example.invalid/login"})
        with ScriptedServer(lambda s: reply) as srv, make_client(srv) as client:
            with pytest.raises(APIStatusError) as info:
                client.chat.completions.create(model="m1", messages=[])
        assert info.value.status_code == 302
        assert "www.example.invalid/login" in str(info.value) and "base_url" in str(info.value)

    def test_success_with_invalid_json_body(self, no_plugins):
        reply = Reply(200, b"<html>oops</html>", {"Content-Type": "text/html"})
        with ScriptedServer(lambda s: reply) as srv, make_client(srv) as client:
            with pytest.raises(cometkit.APIError) as info:
                client.chat.completions.create(model="m1", messages=[])
        assert "not JSON" in str(info.value)

    def test_read_timeout(self, no_plugins):
        reply = Reply(200, json.dumps(chat_body()).encode(), delay_s=3)
        with ScriptedServer(lambda s: reply) as srv, make_client(srv, timeout=0.3) as client:
            with pytest.raises(APITimeoutError) as info:
                client.chat.completions.create(model="m1", messages=[])
        assert info.value.stage == "read"

    def test_per_call_timeout_overrides_config(self, no_plugins):
        reply = Reply(200, json.dumps(chat_body()).encode(), delay_s=3)
        with ScriptedServer(lambda s: reply) as srv, make_client(srv) as client:
            with pytest.raises(APITimeoutError):
                client.chat.completions.create(model="m1", messages=[], timeout=0.3)

    def test_connection_refused_is_a_connect_error(self, no_plugins):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        with cometkit.Client(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1") as client:
            with pytest.raises(APIConnectionError) as info:
                client.models.list()
        assert info.value.stage == "connect"
        # a refusal is no timeout (urllib3 2's NewConnectionError subclasses
        # ConnectTimeoutError)
        assert not isinstance(info.value, APITimeoutError), info.value

    def test_reset_and_truncated_body_are_read_errors(self, no_plugins):
        for action in ("reset", "truncate"):
            reply = Reply(200, json.dumps(chat_body()).encode(), action=action)
            with ScriptedServer(lambda s, r=reply: r) as srv, make_client(srv) as client:
                with pytest.raises(APIConnectionError) as info:
                    client.chat.completions.create(model="m1", messages=[])
            assert info.value.stage == "read", action
            assert srv.count == 1


class TestSecretsAndSafety:
    def test_key_never_in_repr_errors_or_debug_logs(self, caplog, no_plugins):
        reply = json_reply(401, {"error": {"message": "Invalid token"}})
        caplog.set_level(logging.DEBUG)
        with ScriptedServer(lambda s: reply) as srv, make_client(srv) as client:
            assert KEY not in repr(client)
            with pytest.raises(AuthenticationError) as info:
                client.chat.completions.create(model="m1", messages=[])
            assert KEY not in str(info.value) and KEY not in repr(info.value)
        assert KEY not in caplog.text

    def test_plain_http_to_a_remote_host_is_refused(self, no_plugins):
        with pytest.raises(ConfigError) as info:
            cometkit.Client(api_key=KEY, base_url="http://api.example.invalid/v1")
        assert "allow_insecure_http" in str(info.value) and KEY not in str(info.value)
        client = cometkit.Client(api_key=KEY, base_url="http://api.example.invalid/v1",
                                 allow_insecure_http=True)
        client.close()

    def test_defaults_from_environment(self, monkeypatch, no_plugins):
        monkeypatch.setenv("COMETAPI_KEY", KEY)
        monkeypatch.delenv("COMETAPI_BASE_URL", raising=False)
        with cometkit.Client() as client:
            assert client.base_url == "https://api.cometapi.com/v1"
        with ScriptedServer() as srv:
            monkeypatch.setenv("COMETAPI_BASE_URL", srv.base_url)
            with cometkit.Client() as client:
                client.models.list()
            assert srv.seen[0].headers["Authorization"] == f"Bearer {KEY}"

    def test_closed_client_refuses_calls(self, server, no_plugins):
        client = make_client(server)
        client.close()
        client.close()  # idempotent
        with pytest.raises(RuntimeError):
            client.models.list()


class TestPool:
    def test_map_keeps_order_and_bounds_in_flight(self, server, no_plugins):
        consumed = []

        def items():
            for i in range(200):
                consumed.append(i)
                yield i

        with make_client(server, concurrency=4) as client:
            results = client.map(lambda i: i * 2, items())
            first = next(results)
            assert first == 0
            assert len(consumed) <= 8 * (2 * 4) + 1  # finished results wait, boundedly
            rest = list(results)
        assert [first, *rest] == [i * 2 for i in range(200)]

    def test_map_return_exceptions(self, server, no_plugins):
        def fn(i):
            if i % 3 == 0:
                raise ValueError(i)
            return i

        with make_client(server) as client:
            out = list(client.map(fn, range(7), return_exceptions=True))
            assert [type(o) for o in out] == [ValueError, int, int, ValueError, int, int,
                                              ValueError]
            with pytest.raises(ValueError):
                list(client.map(fn, range(7)))

    def test_submit_returns_future(self, server, no_plugins):
        with make_client(server) as client:
            future = client.submit(client.chat.completions.create, model="m1", messages=[])
            assert future.result(timeout=10).model == "m1"

    def test_64_threads_share_one_client(self, no_plugins):
        limiter = CountingLimiter()
        with ScriptedServer() as srv, make_client(srv, concurrency=8,
                                                  extra_plugins=[limiter]) as client:
            errors = []

            def worker():
                try:
                    for _ in range(5):
                        client.chat.completions.create(model="m1", messages=[])
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=worker) for _ in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert srv.count == 320
        assert limiter.released == 320 and limiter.held == 0
        assert client.stats["calls"] == 320 and client.stats["attempts"] == 320


class TestMapDoesNotStall:
    def test_a_slow_item_does_not_stop_later_items(self, server, no_plugins):
        release = threading.Event()
        finished = []

        def fn(i):
            if i == 0:
                assert release.wait(10)
            finished.append(i)
            return i

        from cometkit._pool_methods import MIN_RESULTS_BUFFERED

        items = MIN_RESULTS_BUFFERED + 200
        with make_client(server, concurrency=2) as client:
            out = []
            consumer = threading.Thread(
                target=lambda: out.extend(client.map(fn, range(items), max_in_flight=2)))
            consumer.start()
            # the consumer waits for item 0; later items still run (well past the window of
            # 2), up to the bound on results waiting for it (max(8 x window, 1024))
            assert wait_until(lambda: len(finished) >= MIN_RESULTS_BUFFERED - 1)
            time.sleep(0.05)
            assert len(finished) <= MIN_RESULTS_BUFFERED
            release.set()
            consumer.join(timeout=10)
            assert out == list(range(items))


@pytest.mark.parametrize("path,operation", [
    ("/chat/completions", "chat"), ("/v1/chat/completions/", "chat"), ("/embeddings", "embeddings"),
    ("/models", "models"), ("/completions", "text_completion"), ("/threads/t1/runs", "request"),
    ("/v1/messages", "chat"), ("/responses", "generate_content"),
    ("/responses/resp_1", "responses"), ("/moderations", "moderations"),
    ("/images/generations", "images"), ("/audio/transcriptions", "audio.transcriptions"),
    ("/audio/speech", "audio.speech"), ("/files?purpose=batch", "files"),
    ("/v1/files/file-1/content", "files"), ("/batches/batch_1/cancel", "batches"),
    ("/models/gpt-4o-mini", "models"),
])
def test_operation_names_follow_opentelemetry_genai(path, operation):
    from cometkit._call_names import operation_for

    assert operation_for(path) == operation


@pytest.mark.parametrize("timeout, error", [(-1, ValueError), ("soon", ValueError),
                                            (True, TypeError), (object(), TypeError)])
def test_every_resource_checks_its_timeout_before_sending(timeout, error):
    with ScriptedServer(lambda seen: json_reply(200, chat_body("ok"))) as srv:
        with make_client(srv) as client:
            with pytest.raises(error, match="timeout"):
                client.chat.completions.create(model="m", messages=[], timeout=timeout)
            with pytest.raises(error, match="timeout"):
                client.embeddings.create(model="m", input="x", timeout=timeout)
            assert srv.seen == []
            # the forms the configuration takes are accepted per call too
            answer = client.chat.completions.create(model="m", messages=[], timeout="30s")
    assert answer.choices[0].message.content == "ok"
