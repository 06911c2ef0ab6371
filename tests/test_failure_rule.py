"""The core's bookkeeping of an attempt (issue 12): one rule for which answers fail, decided
once where the answer is read (``cometkit._answers``) and read back by the limiters as
``AttemptResult.accepted``; and one update of the client's counters per call."""

from __future__ import annotations

import pytest
from scripted_server import Reply, ScriptedServer, Seen

import cometkit
from cometkit_plugins.limiter import AdmissionLimiter

KEY = "sk-test-failure-rule-2a"
MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_redirect_fails_the_clients_call_and_does_not_grow_the_adaptive_limit():
    """The client's transport follows no redirect, so a 3xx is a failure there -- for the
    caller (an error) and for the limiter alike (no success to grow on)."""
    limiter = AdmissionLimiter(max_concurrency=16)

    class Plugin:
        @cometkit.hookimpl(tryfirst=True)
        def cometkit_make_limiter(self, ctx: object) -> AdmissionLimiter:
            return limiter

    def handler(seen: Seen) -> Reply:
        return Reply(302, b"", {"Location": "http://127.0.0.1:9/elsewhere",
                                 "Content-Length": "0"})

    with ScriptedServer(handler) as server, cometkit.Client(
            KEY, server.base_url, extra_plugins=[Plugin()]) as client:
        for _ in range(10):
            with pytest.raises(cometkit.APIStatusError) as info:
                client.chat.completions.create(model="m1", messages=MESSAGES)
            assert info.value.status_code == 302
        lane = limiter.stats()["models"]["m1"]
    assert lane["limit"] == 4  # slow start would have grown it by one per success


def test_a_call_updates_the_client_counters_once_with_everything_it_did(monkeypatch):
    """One lock per call for the counters: a call that was retried twice counts its call,
    attempts, retries and failure in one update."""
    attempts = []

    def handler(seen: Seen) -> Reply:
        attempts.append(1)
        return Reply(503, b'{"error": {"message": "busy"}}',
                     {"Content-Type": "application/json"})

    with ScriptedServer(handler) as server, cometkit.Client(KEY, server.base_url, config={
            "plugins": {"backoff": {"retry_on": [503], "max_attempts": 3,
                                    "failure_base_delay": 0, "jitter": "none"}}}) as client:
        updates = []
        real = client._engine.count
        monkeypatch.setattr(client._engine, "count",
                            lambda **deltas: updates.append(deltas) or real(**deltas))
        with pytest.raises(cometkit.InternalServerError):
            client.chat.completions.create(model="m1", messages=MESSAGES)
        assert updates == [{"calls": 1, "attempts": 3, "retries": 2, "failures": 1}]
        assert {k: client.stats[k] for k in ("calls", "attempts", "retries", "failures")} == \
            {"calls": 1, "attempts": 3, "retries": 2, "failures": 1}
    assert len(attempts) == 3
