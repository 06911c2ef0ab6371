"""The openai SDK's request options on every method and on the client: ``extra_body`` (merged),
``extra_query``, ``extra_headers``, timeout objects, ``default_headers``/``default_query``,
``organization``/``project``, ``max_retries``, ``with_options`` views, unknown keywords."""

from __future__ import annotations

import json

import httpx
import pytest
from fakes import FakeClock
from scripted_server import Reply, ScriptedServer, chat_body, json_reply

import cometkit
from cometkit import APITimeoutError, ConfigError, InternalServerError

KEY = "sk-test-options-SECRET"
MESSAGES = [{"role": "user", "content": "hi"}]
EMBEDDING = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [1.0]}],
             "model": "e1", "usage": {"prompt_tokens": 1, "total_tokens": 1}}


@pytest.fixture
def no_plugins(monkeypatch):
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "")


@pytest.fixture
def backoff_only(monkeypatch):
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "backoff")


@pytest.fixture
def server():
    def answer(seen):
        return json_reply(200, EMBEDDING if seen.path.startswith("/v1/embeddings")
                          else chat_body())

    with ScriptedServer(answer) as srv:
        yield srv


def client_for(srv, **kw) -> cometkit.Client:
    return cometkit.Client(KEY, srv.base_url, **kw)


# -- extra_body, extra_query, extra_headers --------------------------------------------------


def test_extra_body_is_merged_into_the_body_not_sent_as_a_key(server, no_plugins):
    with client_for(server) as client:
        client.chat.completions.create(model="m1", messages=MESSAGES, temperature=0.5,
                                       extra_body={"top_k": 40, "temperature": 0.1})
        client.embeddings.create(model="e1", input="x", extra_body={"truncate": "END"})
    chat, embeddings = (seen.json() for seen in server.seen)
    assert chat == {"model": "m1", "messages": MESSAGES, "temperature": 0.1, "top_k": 40}
    assert embeddings == {"model": "e1", "input": "x", "truncate": "END"}


def test_extra_query_and_extra_headers_reach_the_server(server, no_plugins):
    with client_for(server) as client:
        client.chat.completions.create(model="m1", messages=MESSAGES,
                                       extra_query={"api-version": "2024-06-01"},
                                       extra_headers={"X-Trace": "t1"})
        client.models.list(extra_query={"limit": 5}, extra_headers={"X-Trace": "t2"})
    first, second = server.seen
    assert first.path == "/v1/chat/completions?api-version=2024-06-01"
    assert first.headers["X-Trace"] == "t1"
    assert second.path == "/v1/models?limit=5" and second.headers["X-Trace"] == "t2"


def test_default_headers_query_organization_and_project_go_with_every_call(server, no_plugins):
    with client_for(server, default_headers={"X-Team": "a", "X-Trace": "default"},
                    default_query={"tenant": "t"}, organization="org-1",
                    project="proj-1") as client:
        client.models.list()
        client.chat.completions.create(model="m1", messages=MESSAGES,
                                       extra_headers={"X-Trace": "call"},
                                       extra_query={"tenant": "call"})
    first, second = server.seen
    assert first.path == "/v1/models?tenant=t"
    assert first.headers["OpenAI-Organization"] == "org-1"
    assert first.headers["OpenAI-Project"] == "proj-1"
    assert first.headers["X-Team"] == "a" and first.headers["X-Trace"] == "default"
    assert second.headers["X-Trace"] == "call"  # the call's own wins
    assert second.path == "/v1/chat/completions?tenant=call"
    assert second.headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("headers,error", [
    ({"X-Bad": "a\r\nInjected: 1"}, ValueError), ({"Bad Name": "x"}, ValueError),
    ({"X-Num": 3}, TypeError), (["X-A"], TypeError),
])
def test_bad_headers_are_refused_before_sending_without_showing_the_value(server, no_plugins,
                                                                          headers, error):
    with client_for(server) as client:
        with pytest.raises(error) as info:
            client.chat.completions.create(model="m1", messages=MESSAGES,
                                           extra_headers=headers)
        with pytest.raises(error):
            client.with_options(default_headers=headers)
    with pytest.raises(error):
        client_for(server, default_headers=headers)
    assert "Injected" not in str(info.value)
    assert server.count == 0


# -- unknown keywords -------------------------------------------------------------------------


@pytest.mark.parametrize("call,name", [
    (lambda c: c.chat.completions.create(model="m1", messages=MESSAGES, temprature=1),
     "temperature"),
    (lambda c: c.chat.completions.create(model="m1", messages=MESSAGES, extra_bdy={}),
     "extra_body"),
    (lambda c: c.embeddings.create(model="e1", input="x", dimension=8), "dimensions"),
    (lambda c: c.models.list(extra_body={"a": 1}), None),
])
def test_an_unknown_keyword_is_a_type_error_and_nothing_is_sent(server, no_plugins, call, name):
    with client_for(server) as client:
        with pytest.raises(TypeError) as info:
            call(client)
    if name is not None:
        assert f"Did you mean {name!r}" in str(info.value)
        assert "extra_body" in str(info.value)
    assert server.count == 0


def test_extra_body_must_be_a_mapping(server, no_plugins):
    with client_for(server) as client:
        with pytest.raises(TypeError, match="extra_body must be a mapping"):
            client.chat.completions.create(model="m1", messages=MESSAGES, extra_body=[1])
    assert server.count == 0


# -- timeouts ---------------------------------------------------------------------------------


class ConnectRead:
    """What the SDK's users pass: an object with ``.connect`` and ``.read``."""

    def __init__(self, connect, read):
        self.connect, self.read = connect, read


@pytest.mark.parametrize("timeout", [0.3, (5, 0.3), ConnectRead(5, 0.3),
                                     httpx.Timeout(0.3, connect=5.0)])
def test_a_call_timeout_in_every_form_cuts_a_stalled_answer(no_plugins, timeout):
    stall = Reply(200, json.dumps(chat_body()).encode(), {"Content-Type": "application/json"},
                  delay_s=3)
    with ScriptedServer(lambda seen: stall) as srv, client_for(srv) as client:
        with pytest.raises(APITimeoutError):
            client.chat.completions.create(model="m1", messages=MESSAGES, timeout=timeout)


def test_a_timeout_object_part_that_is_none_keeps_the_clients(server, no_plugins):
    with client_for(server, timeout={"connect": 4, "read": 40}) as client:
        assert client.with_options(timeout=ConnectRead(None, 7)).timeout_s == (4, 7)
        assert client.with_options(timeout=httpx.Timeout(None)).timeout_s == (4, 40)
    with client_for(server, timeout=httpx.Timeout(30.0, connect=3.0)) as client:
        assert client.timeout_s == (3.0, 30.0)


def test_a_timeout_of_another_type_is_refused(server, no_plugins):
    with client_for(server) as client:
        with pytest.raises(TypeError, match=r"\.connect and \.read"):
            client.models.list(timeout=object())


# -- max_retries ------------------------------------------------------------------------------


def failing_server():
    return ScriptedServer(lambda seen: json_reply(500, {"error": {"message": "down"}}))


RETRY_500 = {"plugins": {"backoff": {"retry_on": [500], "max_attempts": 5,
                                     "base_delay": 0.01}}}


@pytest.mark.parametrize("max_retries,attempts", [(0, 1), (2, 3)])
def test_max_retries_sets_the_attempts_per_call(backoff_only, max_retries, attempts):
    with failing_server() as srv, client_for(srv, config=RETRY_500, clock=FakeClock(),
                                             max_retries=max_retries) as client:
        with pytest.raises(InternalServerError) as info:
            client.models.list()
    assert srv.count == attempts
    if max_retries:
        assert f"(max_retries={max_retries})" in str(info.value)


def test_without_max_retries_the_policy_keeps_its_own_limit(backoff_only):
    with failing_server() as srv, client_for(srv, config=RETRY_500, clock=FakeClock()) as client:
        with pytest.raises(InternalServerError):
            client.models.list()
    assert srv.count == 5


def test_max_retries_without_a_retry_policy_is_a_config_error(server, no_plugins):
    with pytest.raises(ConfigError, match="max_retries=2: no retry policy") as info:
        client_for(server, max_retries=2)
    assert info.value.key == "max_retries"
    client_for(server, max_retries=0).close()  # nothing to retry: fine


@pytest.mark.parametrize("value,error", [(-1, ValueError), (True, TypeError), ("3", TypeError)])
def test_a_bad_max_retries_is_refused(server, no_plugins, value, error):
    with pytest.raises(error, match="max_retries"):
        client_for(server, max_retries=value)


# -- with_options -----------------------------------------------------------------------------


def test_with_options_shares_pool_limiter_sinks_and_plugins(server, tmp_path):
    config = {"plugins": {"csv_metrics": {"path": str(tmp_path / "a.csv")}}}
    with client_for(server, config=config) as client:
        view = client.with_options(timeout=9, default_headers={"X-View": "1"})
        for part in ("_transport", "_engine", "_executor", "_plugins"):
            assert getattr(view, part) is getattr(client, part), part
        assert view.timeout_s == (9.0, 9.0) and client.timeout_s != (9.0, 9.0)
        view.models.list()
        client.models.list()
        assert client.stats["calls"] == 2  # one engine counts both
    assert server.seen[0].headers.get("X-View") == "1"
    assert "X-View" not in server.seen[1].headers
    rows = (tmp_path / "a.csv").read_text().splitlines()
    assert len(rows) == 3  # the header and both calls, in the one shared sink


def test_with_options_max_retries_applies_to_the_view_only(backoff_only):
    with failing_server() as srv, client_for(srv, config=RETRY_500, clock=FakeClock()) as client:
        with pytest.raises(InternalServerError):
            client.with_options(max_retries=1).models.list()
        assert srv.count == 2
        with pytest.raises(InternalServerError):
            client.models.list()
        assert srv.count == 2 + 5


def test_closing_a_view_leaves_the_client_open_and_closing_the_client_ends_views(server,
                                                                                no_plugins):
    client = client_for(server)
    with client.with_options(default_query={"v": "1"}) as view:
        view.models.list()
    with pytest.raises(RuntimeError, match="closed"):
        view.models.list()
    client.models.list()  # still open
    other = client.with_options(timeout=5)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        other.models.list()
    with pytest.raises(RuntimeError, match="closed"):
        client.with_options(timeout=5)


def test_with_options_refuses_what_it_cannot_change(server, no_plugins):
    with client_for(server) as client:
        with pytest.raises(TypeError):
            client.with_options(api_key="sk-other")
        with pytest.raises(ValueError, match="max_retries"):
            client.with_options(max_retries=-1)


# -- through client.openai() ------------------------------------------------------------------


def test_client_openai_carries_default_headers_query_and_max_retries(monkeypatch):
    pytest.importorskip("openai")
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "backoff")
    with ScriptedServer(lambda seen: json_reply(200, chat_body())) as srv, \
            client_for(srv, organization="org-9", default_query={"tenant": "t"}) as client:
        sdk = client.openai()
        sdk.chat.completions.create(model="m1", messages=MESSAGES)
    (seen,) = srv.seen
    headers = {name.lower(): value for name, value in seen.headers.items()}
    assert headers["openai-organization"] == "org-9"
    assert seen.path == "/v1/chat/completions?tenant=t"
    with failing_server() as srv, client_for(srv, config=RETRY_500, clock=FakeClock()) as client:
        sdk = client.with_options(max_retries=1).openai()
        with pytest.raises(Exception) as info:
            sdk.models.list()
    assert type(info.value).__name__ == "InternalServerError"  # the SDK's own
    assert type(info.value).__module__.startswith("openai")
    assert srv.count == 2  # cometkit's max_retries=1, the SDK's own retries off
