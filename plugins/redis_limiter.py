"""``redis_limiter``: one admission limit shared by every process and host that uses an API key.

The in-process ``limiter`` sees only its own process's traffic; a provider's limit is one
number for every gunicorn or Celery worker on every host. This plugin keeps the state in Redis
instead, with the ``limiter``'s options (plus where Redis is and what to do when it is not):

- **Concurrency** is a set of *leases*: a sorted set per scope (the client, each model) whose
  members are permit ids scored by their expiry. Acquiring reaps expired leases, then adds one
  if the set holds fewer than the limit; releasing removes it. A background thread renews the
  leases of attempts still running every ``lease_ttl / 3``, so a process killed with SIGKILL
  loses its slots within ``lease_ttl`` while a long call keeps its own.
- **Rates** (``requests_per_minute``, ``tokens_per_minute``, per client and per model) are GCRA:
  one key per limit holding a *theoretical arrival time*, charged once per attempt with a
  weight (1 request, or the token estimate), so no per-token or per-request entries pile up.
  It is the ``limiter``'s token bucket (``burst`` seconds' worth, less ``safety_margin``) in
  one number; the token estimate is corrected from ``usage`` on release.
- **Adaptive** mode is shared per model: a 429 seen by any process sets a *hold* key that
  expires after the server's ``Retry-After`` (every process waits it out before admitting), and
  cuts the model's shared concurrency limit multiplicatively -- once per burst: a 429 for an
  attempt admitted before the last cut is an echo of it. Successes grow the limit back by one
  per window (slow start until the first cut), as the in-process limiter does.

Every change of state is one Lua script (``EVALSHA``), atomic in Redis and timed by Redis'
own ``TIME``, so the hosts' clocks need not agree. Keys are ``<key_prefix>:<sha256 of the API
key, 16 hex digits>:...``: never the key itself.

Waiting does not spin: a refused attempt sleeps for the exact time Redis says (a hold, a rate)
or, when it waits for a slot another process holds, polls with a backoff from 5 to 50 ms
(with jitter). Admission across processes is not first come, first served.

When Redis cannot be reached (``on_redis_error``) attempts fall back to an in-process
``AdmissionLimiter`` built from the same options (``local``, the default), go out unlimited
(``fail_open``) or fail with ``RateLimitError`` (``fail_closed``); Redis is tried again every
few seconds. Socket timeouts bound every Redis call, so a dead Redis never hangs a call.

Needs the ``redis`` extra (``pip install 'cometkit[redis]'``); the library is imported only
when a client enables the plugin. Documented in ``docs/deployment.md``.
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
    return RedisLimiter.from_options(ctx.options(PLUGIN_NAME), concurrency=ctx.concurrency,
                                     namespace=ctx.api_key_fingerprint, clock=ctx.clock,
                                     rng=ctx.random)
