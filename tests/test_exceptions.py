"""The exception fields openai users read: ``OpenAIError``, ``e.body`` (the inner error
object), ``e.code``/``e.type``/``e.param``, and the transport error chained as ``__cause__``."""

from __future__ import annotations

import json
import socket

import pytest
import requests
import urllib3
from misbehaving_server import MisbehavingServer, bad_status_line
from scripted_server import Reply, ScriptedServer, json_reply
from test_security import exception_texts, new_marker

import cometkit
from cometkit import APIConnectionError, APIError, BadRequestError, OpenAIError, RateLimitError

KEY = "sk-test-SECRET-MARKER-4242"
ERROR = {"message": "Invalid 'messages': expected an array.", "type": "invalid_request_error",
         "param": "messages", "code": "invalid_type"}


@pytest.fixture
def no_plugins(monkeypatch):
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_openai_error_is_the_base_of_every_cometkit_error():
    assert cometkit.OpenAIError is cometkit.CometError
    assert "OpenAIError" in cometkit.__all__
    for cls in (cometkit.APIError, cometkit.APIStatusError, cometkit.RateLimitError,
                cometkit.APIConnectionError, cometkit.APITimeoutError, cometkit.ConfigError):
        assert issubclass(cls, OpenAIError), cls


def test_body_is_the_inner_error_object_with_code_type_and_param(no_plugins):
    reply = json_reply(400, {"error": ERROR}, **{"x-request-id": "req-1"})
    with ScriptedServer(lambda seen: reply) as srv, \
            cometkit.Client(KEY, srv.base_url) as client:
        with pytest.raises(OpenAIError) as info:
            client.chat.completions.create(model="m1", messages=[])
    error = info.value
    assert isinstance(error, BadRequestError)
    assert error.body == ERROR  # as openai-python's e.body
    assert error.response_body == {"error": ERROR}  # the whole answer, kept
    assert (error.code, error.type, error.param) == ("invalid_type", "invalid_request_error",
                                                     "messages")
    assert error.status_code == 400 and error.request_id == "req-1"


def test_an_error_without_an_error_object_has_no_type_or_param(no_plugins):
    reply = json_reply(500, {"detail": "upstream down"})
    with ScriptedServer(lambda seen: reply) as srv, \
            cometkit.Client(KEY, srv.base_url) as client:
        with pytest.raises(APIError) as info:
            client.models.list()
    assert info.value.body == {"detail": "upstream down"}
    assert info.value.type is None and info.value.param is None


def test_a_policy_that_gives_up_keeps_body_and_fields(monkeypatch):
    """The backoff plugin rebuilds the error with its explanation; the fields survive."""
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "backoff")
    error = {"message": "slow down", "type": "requests", "param": None,
             "code": "rate_limit_exceeded"}
    reply = json_reply(429, {"error": error}, **{"retry-after-ms": "1"})
    config = {"plugins": {"backoff": {"max_attempts": 2, "base_delay": 0.001}}}
    with ScriptedServer(lambda seen: reply) as srv, \
            cometkit.Client(KEY, srv.base_url, config=config) as client:
        with pytest.raises(RateLimitError) as info:
            client.models.list()
    assert "gave up after 2 attempts" in str(info.value)
    assert info.value.body == error and info.value.response_body == {"error": error}
    assert info.value.type == "requests" and info.value.code == "rate_limit_exceeded"


def test_a_refused_connection_chains_the_transport_error(no_plugins):
    with cometkit.Client(KEY, f"http://127.0.0.1:{free_port()}/v1") as client:
        with pytest.raises(APIConnectionError) as info:
            client.models.list()
    cause = info.value.__cause__
    assert isinstance(cause, (requests.exceptions.RequestException,
                              urllib3.exceptions.HTTPError)), repr(cause)


def test_a_transport_error_quoting_the_key_is_not_chained(no_plugins):
    """A malformed status line that echoes the key: the error's own text is blanked, and
    the HTTP library's exception (which quotes it) is left out of the chain."""
    key = new_marker()
    with MisbehavingServer(bad_status_line) as server, \
            cometkit.Client(key, server.base_url) as client:
        with pytest.raises(APIConnectionError) as info:
            client.models.list()
    assert info.value.__cause__ is None
    assert key not in exception_texts(info.value)


def test_an_error_event_in_a_stream_has_the_same_fields(no_plugins):
    error = {"message": "quota gone", "type": "insufficient_quota", "param": None,
             "code": "insufficient_quota"}
    events = [json.dumps({"error": error})]
    with ScriptedServer(lambda seen: Reply(events=events)) as srv, \
            cometkit.Client(KEY, srv.base_url) as client:
        with pytest.raises(APIError) as info:
            list(client.chat.completions.create(model="m1", messages=[], stream=True))
    assert info.value.body == error and info.value.response_body == {"error": error}
    assert info.value.code == "insufficient_quota" and info.value.type == "insufficient_quota"
