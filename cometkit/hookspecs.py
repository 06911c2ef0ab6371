"""Hook specifications: the contract between the cometkit core and its plugins.

The core decides *when* things happen; plugins decide *what*. Each client asks its plugins,
once, for the objects that hold policy (a retry policy, a limiter, metrics sinks) and then
calls those objects on every attempt, so the per-request cost of the plugin system is a few
method calls, not a hook dispatch per event.

With no plugin registered a call goes out once, unlimited and unrecorded: the core has no
policy of its own. The first-party plugins (``backoff``, ``limiter``, ``csv_metrics``,
``stdout_metrics``) implement these hooks with ``trylast=True``, so any third-party plugin
that implements the same ``firstresult`` hook takes precedence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .context import ClientContext
    from .options import PluginSpec
    from .plugin_api import Limiter, MetricsSink, RetryPolicy

#: The pluggy project name; hook implementations use :data:`hookimpl`.
PROJECT_NAME = "cometkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marker for hook implementations: ``@cometkit.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------------------------
# Configuration
# -------------------------------------------------------------------------------------------


@hookspec
def cometkit_plugin_spec() -> Optional[PluginSpec]:
    """Declare the options this plugin accepts and whether it is on by default.

    Called once per plugin (with that plugin alone) when a client is built, before any
    factory hook. The plugin's section under ``plugins:`` in the YAML configuration, keyed by
    its entry-point name (or the module path it is configured by), is validated against
    :attr:`PluginSpec.options`; the validated section (defaults filled in) is then available to
    the plugin's factory hooks as ``ctx.options()``: each plugin's ``ctx`` holds its own
    section only, whatever name it was registered under. A plugin without this hook accepts
    no options (``<name>: true``) and is enabled only when the configuration names it.

    :returns: a :class:`cometkit.PluginSpec`, or ``None`` for no options.
    """


# -------------------------------------------------------------------------------------------
# Retry strategy
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cometkit_make_retry_policy(ctx: ClientContext) -> Optional[RetryPolicy]:
    """Create the retry policy of a client.

    Stops at first non-None result. The returned object's ``decide(result)`` is called after
    every failed attempt with an :class:`cometkit.AttemptResult` and answers with a
    :class:`cometkit.RetryDecision`; ``on_call_start(request)`` is called once per call. The
    core sleeps the decided delay without holding a limiter slot and never retries on its own.

    :param ctx: the client's context: plugin options, clock, random source, concurrency.
    :returns: a :class:`cometkit.RetryPolicy`, or ``None`` to let another plugin decide. When
        every plugin returns ``None`` a failed attempt is final.
    """


# -------------------------------------------------------------------------------------------
# Limiter (admission control)
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cometkit_make_limiter(ctx: ClientContext) -> Optional[Limiter]:
    """Create the limiter that admits each attempt of a client.

    Stops at first non-None result. Before every attempt the core calls
    ``limiter.acquire(request, timeout_s)`` (``timeout_s``: what is left of the call's
    deadline, ``None`` without one) and, when the attempt ends, exactly once
    ``limiter.release(permit, result)`` with the :class:`cometkit.AttemptResult` (status,
    headers, usage) so an adaptive limiter can react to a 429. For a stream the slot is held
    until the stream is exhausted, closed or garbage-collected. ``release`` always runs on an
    ordinary thread, never from inside a garbage collection (the core queues an abandoned
    stream's release), so a plain ``threading.Lock`` guards a limiter's state.
    ``close()`` is called when the client closes.

    :param ctx: the client's context.
    :returns: a :class:`cometkit.Limiter`, or ``None`` to let another plugin decide. When every
        plugin returns ``None`` attempts are admitted at once.
    """


# -------------------------------------------------------------------------------------------
# Metrics sinks
# -------------------------------------------------------------------------------------------


@hookspec
def cometkit_make_metrics_sink(ctx: ClientContext) -> Optional[MetricsSink]:
    """Create a metrics sink for a client.

    Every plugin's result is used (not firstresult): each non-None sink receives
    ``record_attempt(record)`` for every attempt and ``record_call(record)`` for every
    finished call, then ``flush()`` and ``close()`` when the client closes. A sink that raises
    never fails the call: the error is logged once per sink and counted in
    ``client.stats["sink_errors"]``.

    :param ctx: the client's context.
    :returns: a :class:`cometkit.MetricsSink`, or ``None`` for no sink.
    """
