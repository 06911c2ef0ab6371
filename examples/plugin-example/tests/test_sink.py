"""The plugin as its users get it: installed, enabled from configuration, called by cometkit.

Runs offline: ``cometkit_sandbox`` is a pytest fixture shipped by cometkit itself (a local
OpenAI-compatible server; ``.base_url`` is its root), so nothing here needs an API key.
"""

from __future__ import annotations

import json

import pytest

import cometkit
from cometkit import CALL_FIELDS, ConfigError

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say hi"}]


def make_client(sandbox, **options):
    config = {"plugins": {"jsonl_sink": options}}
    return cometkit.Client("sk-sandbox", sandbox.base_url, config=config)


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_one_line_per_call_with_every_call_record_field(cometkit_sandbox, tmp_path):
    path = tmp_path / "calls.jsonl"
    with make_client(cometkit_sandbox, path=str(path)) as client:
        assert "jsonl_sink" in client.plugins
        for count in range(1, 4):
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert len(read_lines(path)) == count  # flushed per line, not only at close
    lines = read_lines(path)
    assert len(lines) == 3
    for line in lines:
        assert list(line) == ["record", *CALL_FIELDS]
        assert line["record"] == "call"
        assert line["outcome"] == "ok" and line["status_code"] == 200
        assert line["operation"] == "chat" and line["model"] == MODEL
    assert len({line["request_id"] for line in lines}) == 3


def test_include_attempts_writes_each_attempt_before_its_call(cometkit_sandbox, tmp_path):
    path = tmp_path / "calls.jsonl"
    with make_client(cometkit_sandbox, path=str(path), include_attempts=True) as client:
        for _ in range(2):
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
    lines = read_lines(path)
    calls = [line for line in lines if line["record"] == "call"]
    assert len(calls) == 2
    for call in calls:
        position = lines.index(call)
        attempts = [line for line in lines[:position]
                    if line["record"] == "attempt" and line["request_id"] == call["request_id"]]
        assert len(attempts) == call["attempts"] >= 1
        assert attempts[-1]["outcome"] == call["outcome"]


def test_concurrent_calls_give_whole_lines(cometkit_sandbox, tmp_path):
    path = tmp_path / "calls.jsonl"
    with make_client(cometkit_sandbox, path=str(path), include_attempts=True) as client:
        results = list(client.map(
            lambda _: client.chat.completions.create(model=MODEL, messages=MESSAGES),
            range(40)))
    assert len(results) == 40
    lines = read_lines(path)  # every line parses: none was interleaved with another
    assert len({line["request_id"] for line in lines if line["record"] == "call"}) == 40


def test_appends_after_a_line_cut_short_by_a_crash(cometkit_sandbox, tmp_path):
    path = tmp_path / "calls.jsonl"
    path.write_text('{"record":"call","request_id":"ck-old"}\n{"record":"ca', encoding="utf-8")
    with make_client(cometkit_sandbox, path=str(path)) as client:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    old, broken, new = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(old)["request_id"] == "ck-old"
    assert broken == '{"record":"ca'
    assert json.loads(new)["outcome"] == "ok"


def test_unusable_path_fails_when_the_client_is_built(cometkit_sandbox, tmp_path):
    with pytest.raises(ConfigError) as info:
        make_client(cometkit_sandbox, path=str(tmp_path / "no-such-dir" / "calls.jsonl"))
    assert info.value.key == "plugins.jsonl_sink.path"
    assert "no-such-dir" in str(info.value)
