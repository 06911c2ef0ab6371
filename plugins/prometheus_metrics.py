"""``prometheus_metrics``: attempt counters and latency histograms for Prometheus.

Needs the ``prometheus`` extra (``pip install 'cometkit[prometheus]'``, i.e.
``prometheus-client``); the library is imported only when a client enables the plugin, so
installing cometkit without it costs nothing.

Series (names follow the Prometheus conventions: a unit suffix, ``_total`` on counters; with
the default ``namespace: cometkit``):

- ``cometkit_client_requests_total{operation, model, status_code, outcome, error_type}``: one
  per attempt, i.e. per HTTP request sent;
- ``cometkit_client_request_duration_seconds{operation, model, status_code, outcome}``: the
  attempt's duration, in the buckets of the OpenTelemetry GenAI
  ``gen_ai.client.operation.duration`` advice (:data:`DURATION_BUCKETS`), so the two exports
  of cometkit can be compared bucket for bucket;
- ``cometkit_client_queue_duration_seconds{operation, model}``: how long each attempt waited
  for admission in the client's limiter (the ``queue_s`` column), in the same buckets; the
  time a call spends between sending and its end is the histogram above, so a slow call shows
  whether the limit or the server held it;
- ``cometkit_client_tokens_total{operation, model, type}``: tokens reported by the server,
  ``type`` is ``input`` or ``output``.

Label values are low-cardinality by construction: the request id and the provider's request
id are never labels (they are in the CSV sink). A missing value (no model, no status because
the connection failed, no error) is the empty string, which Prometheus treats as an absent
label.

By default the series go to ``prometheus_client.REGISTRY``, so an application that already
serves ``/metrics`` shows them with no further setup. Metric objects are created once per
registry and namespace and shared by every client of the process, so a second client neither
raises "Duplicated timeseries" nor splits the counts. ``port`` starts
``prometheus_client.start_http_server`` on ``addr`` (loopback by default); clients asking for
the same address share one server, which stops when the last of them closes.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from typing import Any, Optional

from cometkit import (
    AttemptRecord,
    CallRecord,
    ClientContext,
    ConfigError,
    Option,
    PluginError,
    PluginSpec,
    hookimpl,
)

__all__ = [
    "DURATION_BUCKETS",
    "PrometheusMetricsSink",
    "cometkit_plugin_spec",
    "cometkit_make_metrics_sink",
]

logger = logging.getLogger("cometkit.plugins.prometheus_metrics")

PLUGIN_NAME = "prometheus_metrics"
MISSING_LIBRARY = (
    "prometheus_metrics needs the prometheus extra: pip install 'cometkit[prometheus]'"
)

#: Bucket upper bounds in seconds: the advisory ``ExplicitBucketBoundaries`` of the
#: OpenTelemetry GenAI metric ``gen_ai.client.operation.duration`` (``+Inf`` is implicit).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                    20.48, 40.96, 81.92)

REQUEST_LABELS = ("operation", "model", "status_code", "outcome", "error_type")
DURATION_LABELS = ("operation", "model", "status_code", "outcome")
QUEUE_LABELS = ("operation", "model")
TOKEN_LABELS = ("operation", "model", "type")

REGISTRIES = ("default", "private")

_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")


def _import_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise PluginError(MISSING_LIBRARY) from exc
    return prometheus_client


def _parse_namespace(value: Any) -> str:
    if not isinstance(value, str) or not (value == "" or _NAMESPACE.match(value)):
        raise ValueError(f"must be a Prometheus metric name prefix (letters, digits, _ and :, "
                         f"not starting with a digit) or empty, got {value!r}")
    return value


class _Metrics:
    """The metric objects of one namespace in one registry, shared by every sink using them.

    Also caches the labelled children: looking one up in ``prometheus_client`` takes a lock
    and builds a tuple of strings, which is more than the hot path needs to pay per attempt.
    """

    def __init__(self, prometheus_client: Any, registry: Any, namespace: str) -> None:
        self.requests = prometheus_client.Counter(
            "client_requests", "Requests (attempts) sent to the API, by outcome.",
            REQUEST_LABELS, namespace=namespace, registry=registry)
        self.duration = prometheus_client.Histogram(
            "client_request_duration_seconds",
            "Duration of each request (attempt), from sending it to its end.",
            DURATION_LABELS, namespace=namespace, registry=registry, buckets=DURATION_BUCKETS)
        self.queue = prometheus_client.Histogram(
            "client_queue_duration_seconds",
            "Time each request (attempt) waited for admission in the client's limiter.",
            QUEUE_LABELS, namespace=namespace, registry=registry, buckets=DURATION_BUCKETS)
        self.tokens = prometheus_client.Counter(
            "client_tokens", "Tokens reported by the API in its answers' usage.",
            TOKEN_LABELS, namespace=namespace, registry=registry)
        self._children: dict[tuple, tuple[Any, Any]] = {}
        self._queue_children: dict[tuple, Any] = {}
        self._token_children: dict[tuple, tuple[Any, Any]] = {}

    def children(self, key: tuple) -> tuple[Any, Any]:
        """(request counter, duration histogram) for ``(operation, model, status, outcome,
        error_type)`` as found in a record."""
        found = self._children.get(key)
        if found is None:
            operation, model, status, outcome, error_type = key
            status_text = "" if status is None else str(status)
            found = (
                self.requests.labels(operation, model or "", status_text, outcome,
                                     error_type or ""),
                self.duration.labels(operation, model or "", status_text, outcome),
            )
            # A race only builds the same children twice: labels() returns the same objects.
            self._children[key] = found
        return found

    def queue_child(self, key: tuple) -> Any:
        """The queue-time histogram for ``(operation, model)``."""
        found = self._queue_children.get(key)
        if found is None:
            operation, model = key
            found = self._queue_children[key] = self.queue.labels(operation, model or "")
        return found

    def token_children(self, key: tuple) -> tuple[Any, Any]:
        """(input, output) token counters for ``(operation, model)``."""
        found = self._token_children.get(key)
        if found is None:
            operation, model = key
            found = (self.tokens.labels(operation, model or "", "input"),
                     self.tokens.labels(operation, model or "", "output"))
            self._token_children[key] = found
        return found


_metrics_lock = threading.Lock()
_metrics: weakref.WeakKeyDictionary[Any, dict[str, _Metrics]] = weakref.WeakKeyDictionary()


def _shared_metrics(prometheus_client: Any, registry: Any, namespace: str) -> _Metrics:
    with _metrics_lock:
        by_namespace = _metrics.setdefault(registry, {})
        found = by_namespace.get(namespace)
        if found is None:
            try:
                found = _Metrics(prometheus_client, registry, namespace)
            except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
                raise ConfigError(
                    f"plugins.{PLUGIN_NAME}.namespace: the registry already holds metrics "
                    f"named like cometkit's ({exc}); they were registered by other code. "
                    f"Choose another namespace.", key=f"plugins.{PLUGIN_NAME}.namespace",
                ) from exc
            by_namespace[namespace] = found
        return found


class _Server:
    def __init__(self, httpd: Any, registry: Any) -> None:
        self.httpd = httpd
        self.registry = registry
        self.users = 1


_servers_lock = threading.Lock()
_servers: dict[tuple[str, int], _Server] = {}


def _open_server(prometheus_client: Any, addr: str, port: int, registry: Any) -> _Server:
    """Start (or join) the HTTP endpoint on ``addr:port``; port 0 always starts a new one."""
    with _servers_lock:
        shared = _servers.get((addr, port)) if port else None
        if shared is not None:
            if shared.registry is not registry:
                raise ConfigError(
                    f"plugins.{PLUGIN_NAME}.port: {addr}:{port} already serves another "
                    f"registry (another client uses registry: private); use another port",
                    key=f"plugins.{PLUGIN_NAME}.port")
            shared.users += 1
            return shared
        try:
            started = prometheus_client.start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"plugins.{PLUGIN_NAME}.port: cannot serve metrics on {addr}:{port}: "
                f"{exc.strerror or exc}", key=f"plugins.{PLUGIN_NAME}.port") from exc
        # Older prometheus-client versions return nothing: the server then runs until the
        # process exits, cannot be shared and its port is not known.
        httpd = started[0] if isinstance(started, tuple) else None
        shared = _Server(httpd, registry)
        if httpd is not None:
            port = httpd.server_address[1]
            _servers[(addr, port)] = shared
        logger.info("serving Prometheus metrics on http://%s:%s/metrics", addr, port or "?")
        return shared


def _close_server(shared: _Server) -> None:
    with _servers_lock:
        shared.users -= 1
        if shared.users > 0 or shared.httpd is None:
            return
        for key, value in list(_servers.items()):
            if value is shared:
                del _servers[key]
    shared.httpd.shutdown()
    shared.httpd.server_close()


class PrometheusMetricsSink:
    """Counts attempts and tokens and observes durations and queue times in a Prometheus
    registry.

    Thread-safe; :meth:`record_attempt` costs three dictionary lookups and the updates of the
    metric children once a label combination has been seen.

    :param registry: the ``CollectorRegistry`` to register in (``prometheus_client.REGISTRY``
        by default). Metric objects are shared with every other sink using the same registry
        and namespace.
    :param namespace: prefix of the metric names (``cometkit`` gives
        ``cometkit_client_requests_total``); may be empty.
    :param port: serve ``registry`` over HTTP on this port (0: any free port, see
        :attr:`http_port`); ``None`` serves nothing.
    :param addr: the address to listen on when ``port`` is set.
    :raises PluginError: ``prometheus-client`` is not installed.
    :raises ConfigError: the names are taken in the registry by other code, or the port cannot
        be opened.
    """

    def __init__(self, *, registry: Any = None, namespace: str = "cometkit",
                 port: Optional[int] = None, addr: str = "127.0.0.1") -> None:
        prometheus_client = _import_prometheus()
        self.registry = prometheus_client.REGISTRY if registry is None else registry
        self.namespace = _parse_namespace(namespace)
        self._metrics = _shared_metrics(prometheus_client, self.registry, self.namespace)
        self._server = (_open_server(prometheus_client, addr, port, self.registry)
                        if port is not None else None)
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def http_port(self) -> Optional[int]:
        """The port the HTTP endpoint listens on (``None`` without one)."""
        if self._server is None or self._server.httpd is None:
            return None
        return int(self._server.httpd.server_address[1])

    def record_attempt(self, record: AttemptRecord) -> None:
        metrics = self._metrics
        requests, duration = metrics.children((record.operation, record.model,
                                               record.status_code, record.outcome,
                                               record.error_type))
        requests.inc()
        duration.observe(record.duration_s)
        if record.queue_s is not None:
            metrics.queue_child((record.operation, record.model)).observe(record.queue_s)
        input_tokens, output_tokens = record.input_tokens, record.output_tokens
        if input_tokens or output_tokens:
            tokens_in, tokens_out = metrics.token_children((record.operation, record.model))
            if input_tokens and input_tokens > 0:
                tokens_in.inc(input_tokens)
            if output_tokens and output_tokens > 0:
                tokens_out.inc(output_tokens)

    def record_call(self, record: CallRecord) -> None:
        """Nothing: calls are the attempts with ``outcome`` ``ok`` or ``error``."""

    def flush(self) -> None:
        """Nothing: Prometheus pulls."""

    def close(self) -> None:
        """Stop the HTTP endpoint if this was its last user. The series stay in the registry
        (counters of a process only grow)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._server is not None:
            _close_server(self._server)

    def __repr__(self) -> str:
        port = f", port={self.http_port}" if self._server is not None else ""
        return f"PrometheusMetricsSink(namespace={self.namespace!r}{port})"


@hookimpl
def cometkit_plugin_spec() -> PluginSpec:
    return PluginSpec(
        summary="Export request counts, durations, queue times and tokens to Prometheus "
                "(extra: cometkit[prometheus]).",
        enabled_by_default=False,
        options={
            "port": Option(
                "int", default=None, nullable=True, minimum=0, maximum=65535,
                help="Serve /metrics over HTTP on this port (0: any free port); null serves "
                     "nothing, for applications that already expose the registry.",
                example=9464),
            "addr": Option(
                "str", default="127.0.0.1",
                help="Address the HTTP endpoint listens on (0.0.0.0 for every interface).",
                example="0.0.0.0"),
            "namespace": Option(
                "str", default="cometkit", parse=_parse_namespace,
                accepts="a Prometheus name prefix (letters, digits, _ and :) or empty",
                help="Prefix of the metric names: cometkit gives "
                     "cometkit_client_requests_total.",
                example="myapp_llm"),
            "registry": Option(
                "str", default="default", choices=REGISTRIES,
                help="`default`: prometheus_client.REGISTRY, shown by an existing /metrics "
                     "endpoint; `private`: a registry of this client's own, served only on "
                     "`port`."),
        },
    )


@hookimpl
def cometkit_make_metrics_sink(ctx: ClientContext) -> Optional[PrometheusMetricsSink]:
    options = ctx.options()
    prometheus_client = _import_prometheus()
    registry = prometheus_client.REGISTRY
    if options["registry"] == "private":
        registry = prometheus_client.CollectorRegistry()
        if options["port"] is None:
            logger.warning("plugins.%s: registry: private without a port exports nothing",
                           PLUGIN_NAME)
    return PrometheusMetricsSink(registry=registry, namespace=options["namespace"],
                                 port=options["port"], addr=options["addr"])
