"""CometAdapter: a legacy requests.Session gets the limiter, retries and metrics."""

from __future__ import annotations

import csv
import socket
import threading

import pytest
import requests
from scripted_server import ScriptedServer, chat_body, json_reply

import cometkit
from cometkit.adapters import CometAdapter


def flaky(every: int):
    """429 (with a zero Retry-After) on every ``every``-th request, else a completion."""
    state = {"n": 0}
    lock = threading.Lock()

    def handler(seen):
        with lock:
            state["n"] += 1
            n = state["n"]
        if n % every == 1:
            return json_reply(429, {"error": {"message": "slow down"}}, **{"retry-after-ms": "0"})
        return json_reply(200, chat_body(model=seen.json()["model"]), **{"x-request-id": f"r{n}"})

    return handler


def test_legacy_session_gets_retries_limits_and_metrics(tmp_path):
    metrics = tmp_path / "m.csv"
    config = {"concurrency": 3,
              "plugins": {"limiter": {"max_concurrency": 3}, "csv_metrics": {"path": str(metrics)}}}
    with ScriptedServer(flaky(every=4)) as srv:
        adapter = CometAdapter.from_config(config, base_url=srv.base_url)
        session = requests.Session()
        session.mount(srv.base_url.rsplit("/v1", 1)[0] + "/", adapter)
        errors = []

        def worker(i):
            try:
                resp = session.post(srv.base_url + "/chat/completions",
                                    json={"model": f"m{i % 2}", "messages": []}, timeout=10)
                assert resp.status_code == 200, resp.text
                assert resp.json()["model"] == f"m{i % 2}"
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        adapter.close()
    assert errors == []
    assert srv.max_in_flight <= 3
    stats = adapter.client.stats
    assert stats["calls"] == 12 and stats["retries"] == srv.count - 12 > 0
    rows = list(csv.DictReader(metrics.open()))
    assert len(rows) == srv.count
    assert {r["model"] for r in rows} == {"m0", "m1"}
    assert {r["route"] for r in rows} == {"/chat/completions"}
    assert {r["operation"] for r in rows} == {"chat"}
    assert {r["outcome"] for r in rows} == {"ok", "retry"}


def test_error_status_comes_back_as_a_response_after_retries_end():
    reply = json_reply(400, {"error": {"message": "bad input"}})
    with ScriptedServer(lambda s: reply) as srv:
        session = requests.Session()
        with CometAdapter(base_url=srv.base_url) as adapter:
            session.mount("http://127.0.0.1", adapter)
            resp = session.post(srv.base_url + "/chat/completions", json={"model": "m"})
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "bad input"
    assert srv.count == 1  # 400 is never retried


def test_broken_connection_raises_the_requests_exception():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    session = requests.Session()
    with CometAdapter(base_url=f"http://127.0.0.1:{port}/v1") as adapter:
        session.mount("http://", adapter)
        with pytest.raises(requests.ConnectionError):
            session.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)


def test_adapter_can_share_an_existing_client():
    with ScriptedServer() as srv, cometkit.Client("k", srv.base_url) as client:
        session = requests.Session()
        adapter = CometAdapter(client)
        session.mount("http://", adapter)
        assert session.get(srv.base_url + "/models").status_code == 200
        adapter.close()
        assert client.stats["calls"] == 1
        client.models.list()  # the shared client is not closed by the adapter
