"""One rule for which answers fail their attempt (issue 12): decided once, where the answer
is read (``cometkit._answers``), and read back by the limiters as ``AttemptResult.accepted``."""

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
