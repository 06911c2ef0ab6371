"""``redis_limiter``: one admission limit shared by every process and host that uses an API key.

The plugin only declares its options and builds the limiter; the limiter is the Redis store
of the limiting plan, :class:`~cometkit_plugins.limiting.redis_store.RedisLimiter` (leases,
GCRA rates, the shared hold and concurrency, the in-process fallback). Needs the ``redis``
extra; documented in ``docs/deployment.md``. The names users import from here are re-exported.
"""

from __future__ import annotations

from cometkit import ClientContext, PluginSpec, hookimpl

from .limiting.redis_store import (
    DEFAULT_URL,
    OPTIONS,
    PLUGIN_NAME,
    RedisLimiter,
    resolve_url,
    shown_url,
)

__all__ = [
    "RedisLimiter",
    "OPTIONS",
    "DEFAULT_URL",
    "PLUGIN_NAME",
    "resolve_url",
    "shown_url",
    "cometkit_plugin_spec",
    "cometkit_make_limiter",
]


# -------------------------------------------------------------------------------------------
# Hooks
# -------------------------------------------------------------------------------------------


@hookimpl
def cometkit_plugin_spec() -> PluginSpec:
    """The ``redis_limiter`` section; off until configured."""
    return PluginSpec(options=OPTIONS, enabled_by_default=False,
                      summary="admission control shared through Redis by every process and "
                              "host using the API key")


@hookimpl
def cometkit_make_limiter(ctx: ClientContext) -> RedisLimiter:
    """The shared limiter. Not ``trylast``: when enabled it replaces the in-process
    ``limiter`` (which stays the fallback when Redis is unreachable)."""
    return RedisLimiter.from_options(ctx.options(), concurrency=ctx.concurrency,
                                     namespace=ctx.api_key_fingerprint, clock=ctx.clock,
                                     rng=ctx.random)
