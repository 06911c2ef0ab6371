"""Building a client: a failed construction closes what it built; public arguments are checked.

Real parts: the real Prometheus sink on a free loopback port, real third-party plugin objects
passed through ``extra_plugins``, the sandbox on 127.0.0.1 for the calls.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Optional

import pytest
from redis_server import free_port

import cometkit
from cometkit import ConfigError, PluginError

KEY = "sk-construction-test"


def port_is_served(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


class ClosingLimiter:
    """A third-party limiter that admits everything and counts how often it is closed."""

    def __init__(self) -> None:
        self.closed = 0

    def acquire(self, request: Any, estimate: Any) -> None:
        return None

    def release(self, permit: Any, result: Any) -> None:
        pass

    def close(self) -> None:
        self.closed += 1


class LimiterPlugin:
    def __init__(self) -> None:
        self.limiter = ClosingLimiter()

    @cometkit.hookimpl
    def cometkit_make_limiter(self, ctx: Any) -> ClosingLimiter:
        return self.limiter


class FailingSinkPlugin:
    """A sink factory that fails, asked after the first-party ones (``trylast``)."""

    def __init__(self) -> None:
        self.armed = True

    @cometkit.hookimpl(trylast=True)
    def cometkit_make_metrics_sink(self, ctx: Any) -> Optional[Any]:
        if self.armed:
            raise RuntimeError("metrics backend unreachable")
        return None


class NotASinkPlugin:
    """Returns an object that fails the MetricsSink check, after every sink was built."""

    @cometkit.hookimpl(trylast=True)
    def cometkit_make_metrics_sink(self, ctx: Any) -> object:
        return object()


def prometheus_config(port: int) -> dict:
    return {"plugins": {"prometheus_metrics": {"port": port, "registry": "private"}}}


@pytest.mark.parametrize("late_failure", [FailingSinkPlugin, NotASinkPlugin])
def test_failed_construction_closes_what_it_built_and_building_again_works(late_failure):
    pytest.importorskip("prometheus_client")
    port = free_port()
    limiter_plugin = LimiterPlugin()
    with pytest.raises(PluginError, match="cometkit_make_metrics_sink"):
        cometkit.Client(KEY, "http://127.0.0.1:9/v1", config=prometheus_config(port),
                        extra_plugins=[limiter_plugin, late_failure()])
    assert not port_is_served(port), "the Prometheus endpoint of the failed client still runs"
    assert limiter_plugin.limiter.closed == 1

    # the same configuration again, in the same process (a private registry on the same port
    # was refused with "already serves another registry" while the first one leaked)
    with cometkit.Client(KEY, "http://127.0.0.1:9/v1", config=prometheus_config(port)) as client:
        assert "prometheus_metrics" in client.plugins
        assert port_is_served(port)
    assert not port_is_served(port)


def open_files_at(path: Path) -> int:
    """How many file descriptors of this process are open on ``path`` (Linux /proc)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(fd) == str(path):
                count += 1
        except OSError:  # closed meanwhile
            pass
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_a_failing_sink_factory_is_named_and_earlier_sinks_are_closed(tmp_path):
    csv_path = tmp_path / "m.csv"
    with pytest.raises(PluginError) as caught:
        cometkit.Client(KEY, "http://127.0.0.1:9/v1",
                        plugins={"csv_metrics": {"path": str(csv_path)}},
                        extra_plugins=[FailingSinkPlugin()])
    assert "FailingSinkPlugin" in str(caught.value)
    assert "metrics backend unreachable" in str(caught.value)
    assert open_files_at(csv_path) == 0, "the CSV sink built before the failure was not closed"


def test_sinks_are_still_all_used_in_pluggy_order(cometkit_sandbox):
    order: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def record_attempt(self, record: Any) -> None:
            order.append(self.name)

        def record_call(self, record: Any) -> None:
            pass

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    class First:
        @cometkit.hookimpl(tryfirst=True)
        def cometkit_make_metrics_sink(self, ctx: Any) -> Recorder:
            return Recorder("first")

    class Last:
        @cometkit.hookimpl(trylast=True)
        def cometkit_make_metrics_sink(self, ctx: Any) -> Recorder:
            return Recorder("last")

    with cometkit.Client(KEY, cometkit_sandbox.base_url, extra_plugins=[Last(), First()]) as c:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert order == ["first", "last"]


# -------------------------------------------------------------------------------------------
# public arguments are checked
# -------------------------------------------------------------------------------------------


@pytest.fixture
def client(cometkit_sandbox):
    with cometkit.Client(KEY, cometkit_sandbox.base_url, concurrency=2) as built:
        yield built


@pytest.mark.parametrize("value, error", [(-1, ValueError), (0, ValueError),
                                          (1.5, TypeError), ("2", TypeError),
                                          (True, TypeError)])
def test_map_checks_max_in_flight(client, cometkit_sandbox, value, error):
    calls: list[int] = []
    with pytest.raises(error, match="max_in_flight"):
        client.map(calls.append, range(5), max_in_flight=value)
    assert calls == []  # nothing was started


def test_map_checks_its_function_and_iterable(client):
    with pytest.raises(TypeError, match="fn must be callable"):
        client.map("not callable", range(3))
    with pytest.raises(TypeError, match="iterable"):
        client.map(str, 42)
    assert list(client.map(str, range(3), max_in_flight=1)) == ["0", "1", "2"]


def test_submit_checks_its_function(client):
    with pytest.raises(TypeError, match="fn must be callable"):
        client.submit(None)
    assert client.submit(lambda a, b=0: a + b, 2, b=3).result(timeout=10) == 5


def test_request_takes_the_timeout_forms_of_the_configuration(client):
    for timeout in (5, 2.5, "30s", (3, 60), {"read": 60}):
        assert client.request("GET", "/models", timeout=timeout).data


@pytest.mark.parametrize("kwargs, error, words", [
    ({"method": 7, "path": "/models"}, TypeError, "method must be a string"),
    ({"method": "", "path": "/models"}, ValueError, "method"),
    ({"method": "GET", "path": None}, TypeError, "path must be a string"),
    ({"method": "GET", "path": "/models", "timeout": -1}, ValueError, "timeout"),
    ({"method": "GET", "path": "/models", "timeout": "soon"}, ValueError, "timeout"),
    ({"method": "GET", "path": "/models", "timeout": object()}, TypeError, "timeout"),
    ({"method": "GET", "path": "/models", "timeout": True}, TypeError, "timeout"),
    ({"method": "GET", "path": "/models", "timeout": (1, 0)}, ValueError, "timeout"),
    ({"method": "GET", "path": "/models", "params": ["a"]}, TypeError, "params"),
    ({"method": "GET", "path": "/models", "headers": "x"}, TypeError, "headers"),
])
def test_request_checks_its_arguments_before_sending(client, cometkit_sandbox, kwargs, error,
                                                     words):
    with pytest.raises(error, match=words):
        client.request(**kwargs)
    assert cometkit_sandbox.stats()["attempts"] == 0


@pytest.mark.parametrize("kwargs, words", [
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": -3}, "concurrency"),
    ({"concurrency": "many"}, "concurrency"),
    ({"timeout": -1}, "timeout"),
    ({"extra_plugins": "backoff"}, "extra_plugins"),
    ({"extra_plugins": None}, "extra_plugins"),
    ({"clock": "now"}, "clock"),
    ({"rng": 42}, "rng"),
    ({"api_key": 12345}, "api_key"),
    ({"base_url": 8080}, "base_url"),
])
def test_client_checks_its_arguments(kwargs, words):
    with pytest.raises((ConfigError, TypeError, ValueError), match=words):
        cometkit.Client(**{"api_key": KEY, "base_url": "http://127.0.0.1:9/v1", **kwargs})
