"""``otel_metrics``: the OpenTelemetry GenAI client metrics.

Needs the ``otel`` extra (``pip install 'cometkit[otel]'``); the library is imported only when
a client enables the plugin. The sink records through the OpenTelemetry *API* on the global
``MeterProvider`` (meter ``cometkit``), so the application's SDK setup (readers, exporters,
views, resource) decides where the data goes; without an SDK the API is a no-op. The meter is
resolved through the API's proxy, so a provider installed after the client was built is used
too.

Instruments (semantic conventions for generative AI, v1.37 and later):

- ``gen_ai.client.operation.duration`` (histogram, ``s``), bucket advice
  :data:`DURATION_BOUNDARIES`;
- ``gen_ai.client.token.usage`` (histogram, ``{token}``), attribute ``gen_ai.token.type``
  ``input`` / ``output``, bucket advice :data:`TOKEN_BOUNDARIES`;
- ``cometkit.client.queue.duration`` (histogram, ``s``): how long each attempt waited for
  admission in the client's limiter (the ``queue_s`` of its record), bucket advice
  :data:`DURATION_BOUNDARIES`. The GenAI conventions have no such instrument, so it carries
  cometkit's own name (as ``db.client.connection.wait_time`` does for a connection pool). The
  wait is a measurement, not an attribute: an attribute holding seconds would make every
  value its own time series.

Attributes: ``gen_ai.operation.name``, ``gen_ai.provider.name`` (``cometapi`` by default; it
replaced ``gen_ai.system`` in semantic conventions 1.37; the old name is not sent),
``gen_ai.request.model``, ``gen_ai.response.model``, ``server.address``, ``server.port``,
``error.type`` (failed attempts only: the exception class, e.g. ``RateLimitError``, or
``_OTHER``) and ``http.request.resend_count`` (retries only). The queue time has the
operation, provider, request model and server attributes only: an attempt waits before it has
an answer or an error. Request ids are never attributes.

**One operation is one attempt.** The conventions define an operation as "a request to an
LLM"; cometkit sends one request per attempt, each with its own status, error and response
model. So every attempt is recorded, and a retried attempt carries
``http.request.resend_count = attempt - 1`` as the HTTP conventions count resends. Filtering
on the absence of ``http.request.resend_count`` gives first tries only; the wait between
attempts is not an operation and is not recorded (the call duration is in the CSV sink's
``calls_path``). Token usage comes from the answers, so it is counted once per call.
"""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import urlsplit

from cometkit import (
    AttemptRecord,
    CallRecord,
    ClientContext,
    Option,
    PluginError,
    PluginSpec,
    __version__,
    hookimpl,
)

__all__ = [
    "QUEUE_DURATION",
    "DURATION_BOUNDARIES",
    "TOKEN_BOUNDARIES",
    "OtelMetricsSink",
    "cometkit_plugin_spec",
    "cometkit_make_metrics_sink",
]

PLUGIN_NAME = "otel_metrics"
MISSING_LIBRARY = "otel_metrics needs the otel extra: pip install 'cometkit[otel]'"

#: The semantic-conventions version whose names this module emits (``gen_ai.provider.name``).
SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"

OPERATION_DURATION = "gen_ai.client.operation.duration"
TOKEN_USAGE = "gen_ai.client.token.usage"
QUEUE_DURATION = "cometkit.client.queue.duration"

#: Advisory bucket boundaries of ``gen_ai.client.operation.duration``, seconds.
DURATION_BOUNDARIES = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                       20.48, 40.96, 81.92)
#: Advisory bucket boundaries of ``gen_ai.client.token.usage``, tokens.
TOKEN_BOUNDARIES = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                    16777216, 67108864)

_OTHER_ERROR = "_OTHER"


def _import_metrics_api() -> Any:
    try:
        from opentelemetry import metrics
    except ImportError as exc:
        raise PluginError(MISSING_LIBRARY) from exc
    return metrics


def _histogram(meter: Any, name: str, unit: str, description: str,
               boundaries: tuple[float, ...]) -> Any:
    """A histogram with the conventions' bucket advice where the API takes it (1.30+);
    older APIs get the SDK's default buckets unless a View sets them."""
    try:
        return meter.create_histogram(name, unit=unit, description=description,
                                      explicit_bucket_boundaries_advisory=boundaries)
    except TypeError:
        return meter.create_histogram(name, unit=unit, description=description)


def _server_port(base_url: str) -> Optional[int]:
    parts = urlsplit(base_url)
    try:
        port = parts.port
    except ValueError:
        return None
    if port is None:
        port = {"https": 443, "http": 80}.get(parts.scheme)
    return port


class OtelMetricsSink:
    """Records :class:`cometkit.AttemptRecord` values on OpenTelemetry histograms.

    Thread-safe. The attribute dictionaries are built once per combination of values and
    reused, so an attempt costs one dictionary lookup and up to four ``record`` calls.

    :param meter_provider: where to create the meter; the global provider by default.
    :param provider_name: value of ``gen_ai.provider.name``.
    :param server_port: value of ``server.port`` (omitted when ``None``).
    :raises PluginError: ``opentelemetry-api`` is not installed.
    """

    def __init__(self, *, meter_provider: Any = None, provider_name: str = "cometapi",
                 server_port: Optional[int] = None) -> None:
        metrics = _import_metrics_api()
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("cometkit", __version__, schema_url=SCHEMA_URL)
        self.provider_name = provider_name
        self.server_port = server_port
        self._duration = _histogram(meter, OPERATION_DURATION, "s", "GenAI operation duration.",
                                    DURATION_BOUNDARIES)
        self._tokens = _histogram(meter, TOKEN_USAGE, "{token}",
                                  "Number of input and output tokens used.", TOKEN_BOUNDARIES)
        self._queue = _histogram(meter, QUEUE_DURATION, "s",
                                 "Time an attempt waited for admission in the client's "
                                 "limiter.", DURATION_BOUNDARIES)
        #: (operation, model, response model, server, error, resend) -> (duration attributes,
        #: input-token attributes, output-token attributes, queue attributes)
        self._attributes: dict[tuple, tuple[dict, dict, dict, dict]] = {}

    def _build(self, key: tuple) -> tuple[dict, dict, dict, dict]:
        operation, model, response_model, server_address, error_type, resend = key
        queue: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": self.provider_name,
        }
        if model:
            queue["gen_ai.request.model"] = model
        if server_address:
            queue["server.address"] = server_address
            if self.server_port is not None:
                queue["server.port"] = self.server_port
        attributes = dict(queue)
        if response_model:
            attributes["gen_ai.response.model"] = response_model
        token_base = dict(attributes)
        if error_type is not None:
            attributes["error.type"] = error_type
        if resend:
            attributes["http.request.resend_count"] = resend
        found = (attributes, {**token_base, "gen_ai.token.type": "input"},
                 {**token_base, "gen_ai.token.type": "output"}, queue)
        # A race only builds equal dictionaries twice.
        self._attributes[key] = found
        return found

    def record_attempt(self, record: AttemptRecord) -> None:
        error_type = None
        if record.outcome != "ok":
            error_type = record.error_type or _OTHER_ERROR
        key = (record.operation, record.model, record.response_model, record.server_address,
               error_type, record.attempt - 1 if record.attempt > 1 else 0)
        found = self._attributes.get(key)
        if found is None:
            found = self._build(key)
        self._duration.record(record.duration_s, found[0])
        if record.queue_s is not None:
            self._queue.record(record.queue_s, found[3])
        if record.input_tokens is not None:
            self._tokens.record(record.input_tokens, found[1])
        if record.output_tokens is not None:
            self._tokens.record(record.output_tokens, found[2])

    def record_call(self, record: CallRecord) -> None:
        """Nothing: every attempt is an operation (see the module documentation)."""

    def flush(self) -> None:
        """Nothing: the application's metric readers decide when to export."""

    def close(self) -> None:
        """Nothing: the instruments belong to the application's MeterProvider, which
        exports (and shuts down) on its own schedule."""

    def __repr__(self) -> str:
        return f"OtelMetricsSink(provider_name={self.provider_name!r})"


@hookimpl
def cometkit_plugin_spec() -> PluginSpec:
    return PluginSpec(
        summary="Record the OpenTelemetry GenAI client metrics (operation duration, token "
                "usage) and the queue time on the global MeterProvider (extra: "
                "cometkit[otel]).",
        enabled_by_default=False,
        options={
            "provider_name": Option(
                "str", default="cometapi",
                help="Value of the gen_ai.provider.name attribute.",
                example="openai"),
        },
    )


@hookimpl
def cometkit_make_metrics_sink(ctx: ClientContext) -> Optional[OtelMetricsSink]:
    options = ctx.options()
    return OtelMetricsSink(provider_name=options["provider_name"],
                           server_port=_server_port(ctx.base_url))
