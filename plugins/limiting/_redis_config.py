"""Where the Redis store finds Redis, and how it talks to it: the ``plugins.redis_limiter``
section (the ``limiter``'s options plus the connection's), the URL and how it is shown, the
``redis`` library (an optional extra, imported only when a client enables the plugin) and the
client built from them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from cometkit import Option, PluginError

from .plan import OPTIONS as LIMITER_OPTIONS

__all__ = ["DEFAULT_URL", "OPTIONS", "PLUGIN_NAME", "connect", "import_redis", "resolve_url",
           "shown_url"]

PLUGIN_NAME = "redis_limiter"

#: Where Redis is when ``url`` is null and ``$REDIS_URL`` is unset or empty.
DEFAULT_URL = "redis://127.0.0.1:6379/0"
URL_VARIABLE = "REDIS_URL"

MISSING_LIBRARY = ("redis_limiter needs the redis extra: pip install 'cometkit[redis]' "
                   "(the redis package)")

_OWN_OPTIONS = {
    "url": Option(
        "str", None, nullable=True, secret=True,
        help="Redis URL (redis://, rediss:// or unix://; a password in it is redacted "
             "wherever configuration is shown). null means $REDIS_URL, else "
             f"{DEFAULT_URL}.", example="redis://redis.internal:6379/0"),
    "key_prefix": Option(
        "str", "cometkit",
        help="First part of every Redis key; the second is a hash of the API key (never the "
             "key itself), so clients with the same key share limits."),
    "lease_ttl": Option(
        "float", 30.0, minimum=0.3, maximum=3600,
        help="Seconds a slot stays taken unless its process renews it (every lease_ttl / 3 "
             "while the attempt runs): how long a killed process can keep slots."),
    "on_redis_error": Option(
        "str", "local", choices=("local", "fail_open", "fail_closed"),
        help="When Redis cannot be reached: local (the in-process limiter with these options, "
             "a warning, Redis retried every few seconds), fail_open (admit) or fail_closed "
             "(raise RateLimitError)."),
    "socket_timeout": Option(
        "float", 0.5, minimum=0.01, maximum=60,
        help="Seconds any one Redis connect or command may take before Redis counts as "
             "unreachable."),
}

#: The ``plugins.redis_limiter`` section: the ``limiter``'s options, shared by the fleet, plus
#: where Redis is.
OPTIONS = {
    # A configured window is in-process only for now: the shared store keeps smooth rates.
    **{key: option for key, option in LIMITER_OPTIONS.items()
       if key not in ("window", "window_align")},
    # The limiter's option, counted across the fleet.
    "max_concurrency": dataclasses.replace(
        LIMITER_OPTIONS["max_concurrency"],
        help="Attempts in flight at once across every process using this Redis and API key; "
             "null means this client's concurrency (set it for a fleet).", example=16),
    **_OWN_OPTIONS,
}


def import_redis() -> Any:
    """The ``redis`` package, or :class:`PluginError` saying which extra to install."""
    try:
        import redis
    except ImportError as exc:
        raise PluginError(MISSING_LIBRARY) from exc
    return redis


def connect(redis: Any, url: str, socket_timeout: float) -> Any:
    """A ``redis.Redis`` for ``url`` whose every connect and command gives up after
    ``socket_timeout``."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries inside redis-py: a dead Redis must cost one timeout, not several with
    # backoff in between; the fallback and the reconnect interval take over.
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)


def resolve_url(url: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """``url``, or (null) ``$REDIS_URL`` when set and not empty, or :data:`DEFAULT_URL`."""
    if url:
        return url
    env = os.environ if environ is None else environ
    return env.get(URL_VARIABLE) or DEFAULT_URL


def shown_url(url: str) -> str:
    """``url`` without user name or password, for logs and error messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable Redis URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"
