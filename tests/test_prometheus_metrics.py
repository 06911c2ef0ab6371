"""The prometheus_metrics sink: names, labels, buckets, sharing, the HTTP endpoint, and a
client run through the plugin system."""

from __future__ import annotations

import itertools
import socket
import sys
import threading

import pytest

pytest.importorskip("prometheus_client")

import prometheus_client
import requests
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scripted_server import ScriptedServer, chat_body, json_reply
from test_summary import attempt

import cometkit
from cometkit import ConfigError, PluginError, SystemClock
from cometkit.options import validate_section
from cometkit_plugins import prometheus_metrics
from cometkit_plugins.prometheus_metrics import (
    DURATION_BUCKETS,
    PrometheusMetricsSink,
)

OTEL_DURATION_BOUNDARIES = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12,
                            10.24, 20.48, 40.96, 81.92]

REQUESTS = "cometkit_client_requests_total"
DURATION = "cometkit_client_request_duration_seconds"
TOKENS = "cometkit_client_tokens_total"


def labels(status="200", outcome="ok", error_type="", model="m1", operation="chat"):
    return {"operation": operation, "model": model, "status_code": status, "outcome": outcome,
            "error_type": error_type}


def duration_labels(status="200", outcome="ok", model="m1", operation="chat"):
    return {"operation": operation, "model": model, "status_code": status, "outcome": outcome}


def families(registry) -> dict:
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_attempts_counted_by_operation_model_status_and_outcome():
    registry = CollectorRegistry()
    sink = PrometheusMetricsSink(registry=registry)
    sink.record_attempt(attempt(request_id="ck-secret-1", status_code=429,
                                error_type="RateLimitError", outcome="retry", duration_s=0.03,
                                provider_request_id="req_provider_9"))
    sink.record_attempt(attempt(request_id="ck-secret-1", attempt=2, duration_s=0.5,
                                input_tokens=12, output_tokens=5))
    sink.record_attempt(attempt(request_id="ck-secret-2", duration_s=0.05, input_tokens=3,
                                output_tokens=0))
    sink.record_attempt(attempt(request_id="ck-secret-3", status_code=None,
                                error_type="APIConnectionError", outcome="error",
                                duration_s=0.001))
    sink.record_attempt(attempt(request_id="ck-secret-4", operation="models", model=None,
                                method="GET", route="/models"))

    value = registry.get_sample_value
    assert value(REQUESTS, labels("429", "retry", "RateLimitError")) == 1
    assert value(REQUESTS, labels()) == 2
    assert value(REQUESTS, labels("", "error", "APIConnectionError")) == 1
    assert value(REQUESTS, labels(model="", operation="models")) == 1
    assert value(DURATION + "_count", duration_labels()) == 2
    assert value(DURATION + "_sum", duration_labels()) == pytest.approx(0.55)
    assert value(DURATION + "_count", duration_labels("429", "retry")) == 1
    assert value(TOKENS, {"operation": "chat", "model": "m1", "type": "input"}) == 15
    assert value(TOKENS, {"operation": "chat", "model": "m1", "type": "output"}) == 5
    # No token series for an operation that never reported usage.
    assert value(TOKENS, {"operation": "models", "model": "", "type": "input"}) is None

    text = generate_latest(registry).decode()
    assert "ck-secret" not in text
    assert "req_provider_9" not in text
    found = families(registry)
    # Names by the Prometheus conventions: counters end in _total (the family drops it),
    # the histogram carries its unit.
    assert found["cometkit_client_requests"].type == "counter"
    assert found["cometkit_client_tokens"].type == "counter"
    assert found[DURATION].type == "histogram"
    for sample in found["cometkit_client_requests"].samples:
        assert set(sample.labels) == {"operation", "model", "status_code", "outcome",
                                      "error_type"}


def test_histogram_buckets_are_the_otel_genai_duration_boundaries():
    assert list(DURATION_BUCKETS) == OTEL_DURATION_BOUNDARIES
    registry = CollectorRegistry()
    sink = PrometheusMetricsSink(registry=registry)
    sink.record_attempt(attempt(duration_s=0.05))
    sink.record_attempt(attempt(duration_s=100.0))
    buckets = {sample.labels["le"]: sample.value
               for sample in families(registry)[DURATION].samples
               if sample.name == DURATION + "_bucket"}
    assert [float(le) for le in buckets] == OTEL_DURATION_BOUNDARIES + [float("inf")]
    assert buckets["0.04"] == 0
    assert buckets["0.08"] == 1  # 0.05 s lands in the (0.04, 0.08] bucket
    assert buckets["81.92"] == 1
    assert buckets["+Inf"] == 2


def test_sinks_on_one_registry_share_the_metrics_instead_of_failing():
    registry = CollectorRegistry()
    first = PrometheusMetricsSink(registry=registry)
    second = PrometheusMetricsSink(registry=registry)
    other = PrometheusMetricsSink(registry=registry, namespace="batch")
    first.record_attempt(attempt())
    second.record_attempt(attempt())
    other.record_attempt(attempt())
    assert registry.get_sample_value(REQUESTS, labels()) == 2
    assert registry.get_sample_value("batch_client_requests_total", labels()) == 1
    unprefixed = PrometheusMetricsSink(registry=registry, namespace="")
    unprefixed.record_attempt(attempt())
    assert registry.get_sample_value("client_requests_total", labels()) == 1


def test_concurrent_recording_loses_no_counts():
    registry = CollectorRegistry()
    sink = PrometheusMetricsSink(registry=registry)

    def work() -> None:
        for i in range(200):
            sink.record_attempt(attempt(model=f"m{i % 4}", input_tokens=1))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    total = sum(registry.get_sample_value(REQUESTS, labels(model=f"m{i}")) for i in range(4))
    assert total == 8 * 200
    tokens = sum(registry.get_sample_value(TOKENS, {"operation": "chat", "model": f"m{i}",
                                                    "type": "input"}) for i in range(4))
    assert tokens == 8 * 200


def test_names_taken_by_other_code_are_a_config_error():
    registry = CollectorRegistry()
    Counter("cometkit_client_requests", "someone else's", registry=registry)
    with pytest.raises(ConfigError, match="namespace"):
        PrometheusMetricsSink(registry=registry)
    PrometheusMetricsSink(registry=registry, namespace="mine").record_attempt(attempt())
    assert registry.get_sample_value("mine_client_requests_total", labels()) == 1


def test_http_endpoint_serves_the_registry_on_loopback_and_stops_with_its_last_user():
    registry = CollectorRegistry()
    sink = PrometheusMetricsSink(registry=registry, port=0)
    port = sink.http_port
    assert port
    # A second sink on the same port joins the running server.
    joined = PrometheusMetricsSink(registry=registry, port=port)
    assert joined.http_port == port
    sink.record_attempt(attempt(status_code=503, error_type="InternalServerError",
                                outcome="error"))
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    assert ('cometkit_client_requests_total{error_type="InternalServerError",model="m1",'
            'operation="chat",outcome="error",status_code="503"} 1.0') in response.text
    # Another registry cannot take over a port that serves this one.
    with pytest.raises(ConfigError, match="another registry"):
        PrometheusMetricsSink(registry=CollectorRegistry(), port=port)
    sink.close()
    sink.close()
    probe = socket.create_connection(("127.0.0.1", port), timeout=5)  # still served
    probe.close()
    joined.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_busy_port_is_a_config_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            PrometheusMetricsSink(registry=CollectorRegistry(), port=port)


def test_options_validate_namespace_and_port():
    spec = prometheus_metrics.cometkit_plugin_spec()
    assert spec.enabled_by_default is False
    assert validate_section(spec.options, {}) == {
        "port": None, "addr": "127.0.0.1", "namespace": "cometkit", "registry": "default"}
    with pytest.raises(ConfigError, match="namespace"):
        validate_section(spec.options, {"namespace": "9lives"}, key_path="plugins.x")
    with pytest.raises(ConfigError, match="port"):
        validate_section(spec.options, {"port": 70000}, key_path="plugins.x")
    with pytest.raises(ConfigError, match="registry"):
        validate_section(spec.options, {"registry": "mine"}, key_path="plugins.x")


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(PluginError, match=r"pip install 'cometkit\[prometheus\]'"):
        PrometheusMetricsSink()


class NoSleepClock(SystemClock):
    """Real time, but retries do not wait."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def test_client_run_through_the_plugin_counts_every_attempt_in_the_default_registry():
    registry = prometheus_client.REGISTRY
    model = "prom-e2e-model"
    retry = labels("429", "retry", "RateLimitError", model=model)
    ok = labels(model=model)
    before = {name: registry.get_sample_value(REQUESTS, which) or 0
              for name, which in (("retry", retry), ("ok", ok))}
    tokens_before = registry.get_sample_value(
        TOKENS, {"operation": "chat", "model": model, "type": "output"}) or 0
    counter = itertools.count()
    lock = threading.Lock()

    def handler(seen):
        with lock:
            n = next(counter)
        if n % 2 == 0:
            return json_reply(429, {"error": {"message": "slow down"}}, **{"Retry-After": "0"})
        return json_reply(200, chat_body(model=model + "-snap"))

    config = {"allow_insecure_http": True, "concurrency": 2,
              "plugins": {"backoff": {"max_attempts": 3}, "limiter": False,
                          "prometheus_metrics": {}}}
    with ScriptedServer(handler) as server:
        with cometkit.Client("sk-test", server.base_url, config=config,
                             clock=NoSleepClock()) as client:
            for _ in range(3):
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}])
        sent = server.count
    assert sent == 6
    assert registry.get_sample_value(REQUESTS, retry) - before["retry"] == 3
    assert registry.get_sample_value(REQUESTS, ok) - before["ok"] == 3
    assert registry.get_sample_value(
        TOKENS, {"operation": "chat", "model": model, "type": "output"}) - tokens_before == 6


def test_client_with_a_private_registry_serves_it_on_the_configured_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {"allow_insecure_http": True,
              "plugins": {"prometheus_metrics": {"port": port, "registry": "private",
                                                 "namespace": "e2e"}}}
    with ScriptedServer() as server:
        with cometkit.Client("sk-test", server.base_url, config=config) as client:
            client.chat.completions.create(model="m1", messages=[{"role": "user",
                                                                  "content": "hi"}])
            with requests.Session() as session:
                session.trust_env = False
                text = session.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert ('e2e_client_requests_total{error_type="",model="m1",operation="chat",'
            'outcome="ok",status_code="200"} 1.0') in text
    # Private: only cometkit's series, not the process collectors of the default registry.
    assert "process_" not in text and "python_gc" not in text
    assert prometheus_client.REGISTRY.get_sample_value("e2e_client_requests_total",
                                                       labels()) is None
    with pytest.raises(OSError):  # the client closed, and with it its endpoint
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_queue_time_is_a_histogram_by_operation_and_model():
    registry = CollectorRegistry()
    sink = PrometheusMetricsSink(registry=registry)
    sink.record_attempt(attempt(status_code=429, outcome="retry", queue_s=0.0))
    sink.record_attempt(attempt(attempt=2, queue_s=1.5))
    sink.record_attempt(attempt(model="m2", queue_s=0.03))
    sink.record_attempt(attempt(model="m3"))  # a record that does not know its queue time
    queue = "cometkit_client_queue_duration_seconds"
    value = registry.get_sample_value
    m1 = {"operation": "chat", "model": "m1"}
    assert value(queue + "_count", m1) == 2
    assert value(queue + "_sum", m1) == pytest.approx(1.5)
    assert value(queue + "_bucket", {**m1, "le": "0.01"}) == 1  # the call admitted at once
    assert value(queue + "_bucket", {**m1, "le": "2.56"}) == 2
    assert value(queue + "_count", {"operation": "chat", "model": "m2"}) == 1
    assert value(queue + "_count", {"operation": "chat", "model": "m3"}) is None
    assert families(registry)["cometkit_client_queue_duration_seconds"].type == "histogram"
