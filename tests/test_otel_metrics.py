"""The otel_metrics sink, read back through the OpenTelemetry SDK's in-memory reader."""

from __future__ import annotations

import itertools
import sys
import threading

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry import metrics as otel_metrics_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from scripted_server import ScriptedServer, chat_body, json_reply
from test_summary import attempt

import cometkit
from cometkit import PluginError, SystemClock
from cometkit.options import validate_section
from cometkit_plugins import otel_metrics
from cometkit_plugins.otel_metrics import OtelMetricsSink, _server_port

DURATION = "gen_ai.client.operation.duration"
TOKENS = "gen_ai.client.token.usage"
DURATION_BOUNDARIES = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                       20.48, 40.96, 81.92]
TOKEN_BOUNDARIES = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                    16777216, 67108864]


@pytest.fixture
def reader():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    reader.provider = provider
    yield reader
    provider.shutdown()


def collect(reader) -> dict:
    """{metric name: (metric, scope)} of everything recorded so far."""
    data = reader.get_metrics_data()
    out = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                out[metric.name] = (metric, scope_metrics.scope)
    return out


def points(found: dict, name: str) -> list:
    return list(found[name][0].data.data_points)


def test_operation_duration_per_attempt_with_semconv_attributes(reader):
    sink = OtelMetricsSink(meter_provider=reader.provider, server_port=443)
    sink.record_attempt(attempt(request_id="ck-secret", status_code=429,
                                error_type="RateLimitError", outcome="retry", duration_s=0.03,
                                server_address="api.cometapi.com",
                                provider_request_id="req_provider_1"))
    sink.record_attempt(attempt(request_id="ck-secret", attempt=2, duration_s=0.5,
                                server_address="api.cometapi.com", model="gpt-4o-mini",
                                response_model="gpt-4o-mini-2024-07-18", input_tokens=12,
                                output_tokens=5))
    found = collect(reader)
    metric, scope = found[DURATION]
    assert metric.unit == "s"
    assert scope.name == "cometkit"
    assert scope.version == cometkit.__version__
    by_attributes = {frozenset(p.attributes.items()): p for p in points(found, DURATION)}
    base = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "cometapi",
            "server.address": "api.cometapi.com", "server.port": 443}
    first = frozenset({**base, "gen_ai.request.model": "m1",
                       "error.type": "RateLimitError"}.items())
    retried = frozenset({**base, "gen_ai.request.model": "gpt-4o-mini",
                         "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                         "http.request.resend_count": 1}.items())
    assert set(by_attributes) == {first, retried}
    assert by_attributes[first].count == 1
    assert by_attributes[first].sum == pytest.approx(0.03)
    assert by_attributes[retried].sum == pytest.approx(0.5)
    assert list(by_attributes[first].explicit_bounds) == DURATION_BOUNDARIES
    # 0.03 s lands in the (0.02, 0.04] bucket.
    assert by_attributes[first].bucket_counts[2] == 1
    assert sum(by_attributes[first].bucket_counts) == 1
    everything = repr([p.attributes for name in found for p in points(found, name)])
    assert "ck-secret" not in everything and "req_provider_1" not in everything


def test_token_usage_by_token_type_without_error_or_resend_attributes(reader):
    sink = OtelMetricsSink(meter_provider=reader.provider)
    sink.record_attempt(attempt(status_code=503, error_type="InternalServerError",
                                outcome="retry"))
    sink.record_attempt(attempt(attempt=2, input_tokens=100, output_tokens=7))
    sink.record_attempt(attempt(input_tokens=20, output_tokens=None, operation="embeddings"))
    found = collect(reader)
    metric, _ = found[TOKENS]
    assert metric.unit == "{token}"
    by_type = {(p.attributes["gen_ai.operation.name"], p.attributes["gen_ai.token.type"]): p
               for p in points(found, TOKENS)}
    assert set(by_type) == {("chat", "input"), ("chat", "output"), ("embeddings", "input")}
    assert by_type["chat", "input"].sum == 100
    assert by_type["chat", "output"].sum == 7
    assert by_type["embeddings", "input"].sum == 20
    assert list(by_type["chat", "input"].explicit_bounds) == TOKEN_BOUNDARIES
    for point in by_type.values():
        assert "error.type" not in point.attributes
        assert "http.request.resend_count" not in point.attributes
        assert "server.port" not in point.attributes  # no port given


def test_failure_without_an_exception_name_is_other_and_no_model_no_attribute(reader):
    sink = OtelMetricsSink(meter_provider=reader.provider, provider_name="openai")
    sink.record_attempt(attempt(status_code=None, error_type=None, outcome="error",
                                attempt=3, model=None, operation="models",
                                server_address=""))
    (point,) = points(collect(reader), DURATION)
    assert dict(point.attributes) == {"gen_ai.operation.name": "models",
                                      "gen_ai.provider.name": "openai", "error.type": "_OTHER",
                                      "http.request.resend_count": 2}


def test_concurrent_recording_loses_nothing(reader):
    sink = OtelMetricsSink(meter_provider=reader.provider)

    def work() -> None:
        for i in range(200):
            sink.record_attempt(attempt(model=f"m{i % 3}", attempt=1 + i % 2,
                                        input_tokens=2))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    found = collect(reader)
    assert sum(p.count for p in points(found, DURATION)) == 6 * 200
    assert sum(p.sum for p in points(found, TOKENS)) == 6 * 200 * 2
    assert len(points(found, DURATION)) == 6  # 3 models x first try / resend


def test_server_port_from_base_url():
    assert _server_port("https://api.cometapi.com/v1") == 443
    assert _server_port("http://127.0.0.1:8080/v1") == 8080
    assert _server_port("http://localhost/v1") == 80


def test_spec_and_missing_library(monkeypatch):
    spec = otel_metrics.cometkit_plugin_spec()
    assert spec.enabled_by_default is False
    assert validate_section(spec.options, {}) == {"provider_name": "cometapi"}
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(PluginError, match=r"pip install 'cometkit\[otel\]'"):
        OtelMetricsSink()


# -------------------------------------------------------------------------------------------
# Through the plugin system, on the global MeterProvider (which the API lets a process set
# only once).
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def global_reader():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    otel_metrics_api.set_meter_provider(provider)
    if otel_metrics_api.get_meter_provider() is not provider:
        pytest.skip("another global MeterProvider was set earlier in this process")
    yield reader


class NoSleepClock(SystemClock):
    def sleep(self, seconds: float) -> None:
        pass


def test_client_run_records_attempts_on_the_global_provider(global_reader):
    counter = itertools.count()
    lock = threading.Lock()

    def handler(seen):
        with lock:
            n = next(counter)
        if n == 0:
            return json_reply(429, {"error": {"message": "slow down"}}, **{"Retry-After": "0"})
        return json_reply(200, chat_body(model="otel-e2e-snap"))

    config = {"allow_insecure_http": True,
              "plugins": {"backoff": {"max_attempts": 3}, "limiter": False,
                          "otel_metrics": {"provider_name": "cometapi-test"}}}
    with ScriptedServer(handler) as server:
        port = server.httpd.server_address[1]
        with cometkit.Client("sk-test", server.base_url, config=config,
                             clock=NoSleepClock()) as client:
            client.chat.completions.create(model="otel-e2e",
                                           messages=[{"role": "user", "content": "hi"}])
    found = collect(global_reader)
    recorded = [dict(p.attributes) for p in points(found, DURATION)
                if p.attributes.get("gen_ai.request.model") == "otel-e2e"]
    base = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "cometapi-test",
            "gen_ai.request.model": "otel-e2e", "server.address": "127.0.0.1",
            "server.port": port}
    assert sorted(recorded, key=len) == [
        {**base, "error.type": "RateLimitError"},
        {**base, "gen_ai.response.model": "otel-e2e-snap", "http.request.resend_count": 1},
    ]
    tokens = {p.attributes["gen_ai.token.type"]: p.sum for p in points(found, TOKENS)
              if p.attributes.get("gen_ai.request.model") == "otel-e2e"}
    assert tokens == {"input": 3, "output": 2}


def test_queue_time_is_its_own_histogram_with_the_request_attributes_only(reader):
    sink = OtelMetricsSink(meter_provider=reader.provider, server_port=443)
    sink.record_attempt(attempt(status_code=429, error_type="RateLimitError", outcome="retry",
                                queue_s=0.25, server_address="api.cometapi.com"))
    sink.record_attempt(attempt(attempt=2, response_model="m1-2024", queue_s=0.75,
                                server_address="api.cometapi.com"))
    sink.record_attempt(attempt(model="m2"))  # queue time not known: not recorded
    found = collect(reader)
    metric, _ = found[otel_metrics.QUEUE_DURATION]
    assert metric.name == "cometkit.client.queue.duration" and metric.unit == "s"
    (point,) = points(found, otel_metrics.QUEUE_DURATION)
    assert dict(point.attributes) == {"gen_ai.operation.name": "chat",
                                      "gen_ai.provider.name": "cometapi",
                                      "gen_ai.request.model": "m1",
                                      "server.address": "api.cometapi.com", "server.port": 443}
    assert (point.count, point.sum) == (2, pytest.approx(1.0))
    assert list(point.explicit_bounds) == DURATION_BOUNDARIES
