"""``limiter``: the first-party admission control, on by default.

The plugin only declares its options and builds the limiter; what the limiter does is the
limiting plan of :mod:`cometkit_plugins.limiting` (its in-process store,
:class:`~cometkit_plugins.limiting.local.AdmissionLimiter`). Documented in
``docs/plugins/limiter.md``. The names users import from here are re-exported.
"""

from __future__ import annotations

from cometkit import ClientContext, PluginSpec, hookimpl

from .limiting.adaptive import (
    CONCURRENCY_BACKOFF,
    DEFAULT_HOLD_S,
    INITIAL_LIMIT,
    MAX_HOLD_S,
    STORM_HORIZON_S,
)
from .limiting.local import PLUGIN_NAME, AdmissionLimiter
from .limiting.plan import CHARS_PER_TOKEN, OPTIONS, estimate_parts, estimate_tokens

__all__ = [
    "AdmissionLimiter",
    "CHARS_PER_TOKEN",
    "CONCURRENCY_BACKOFF",
    "DEFAULT_HOLD_S",
    "INITIAL_LIMIT",
    "MAX_HOLD_S",
    "STORM_HORIZON_S",
    "OPTIONS",
    "PLUGIN_NAME",
    "estimate_parts",
    "estimate_tokens",
    "cometkit_plugin_spec",
    "cometkit_make_limiter",
]


# -------------------------------------------------------------------------------------------
# Hooks
# -------------------------------------------------------------------------------------------


@hookimpl
def cometkit_plugin_spec() -> PluginSpec:
    """The ``limiter`` section; on by default."""
    return PluginSpec(options=OPTIONS, enabled_by_default=True,
                      summary="in-process admission control: concurrency, requests/tokens per "
                              "minute, adaptive")


@hookimpl(trylast=True)
def cometkit_make_limiter(ctx: ClientContext) -> AdmissionLimiter:
    """The client's limiter, from ``plugins.limiter`` and the client's concurrency."""
    return AdmissionLimiter.from_options(ctx.options(), concurrency=ctx.concurrency,
                                         clock=ctx.clock)
