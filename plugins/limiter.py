"""``limiter``: the first-party admission control, on by default.

Every attempt waits here for a slot before it is sent and gives the slot back when it ends
(the core sleeps between retries *without* a slot). A call needs a slot of the client
(``max_concurrency``, ``requests_per_minute``, ``tokens_per_minute``) and one of its model's
lane (the ``models:`` overrides, and what adaptive mode learned for that model), so a model
that is refused slows down alone. Rates are token buckets holding ``burst`` seconds' worth,
not a minute's: a minute's burst at start-up is exactly what earns 429s.

Waiters are admitted first come, first served (per model: a call whose model is at its limit
does not block calls for other models, but nothing overtakes an older call of its own model
or an older call waiting for the client's own limits). Nobody polls: waiters sleep on a
condition, and the oldest one sleeps with a timeout computed for the next instant anything
may change (a bucket refilling, a hold ending). With an injected clock other than the system
clock, that timed wait is ``clock.sleep()``, so a fake clock jumps straight there.

Options and the adaptive algorithm are documented in ``docs/plugins/limiter.md``; the
plan itself lives in the :mod:`cometkit_plugins.limiting` package (plan, buckets, adaptive,
the local store and the Redis store); this module is the plugin: its spec and its factory.
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
    return AdmissionLimiter.from_options(ctx.options(PLUGIN_NAME), concurrency=ctx.concurrency,
                                         clock=ctx.clock)
