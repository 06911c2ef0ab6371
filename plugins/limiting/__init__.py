"""One limiting plan, two stores.

The ``limiter`` and ``redis_limiter`` plugins are thin: each declares its options and builds its
limiter. What they enforce is written once, here:

- :mod:`.plan`: the options, the token estimate, and the arithmetic of rates, lane caps and
  token charges that both stores share;
- :mod:`.buckets`: the token bucket, measured against an injected clock;
- :mod:`.adaptive`: the adaptive policy (concurrency, send and token rates, holds, half-open
  probes, windows, caps on calls in flight), one object per model lane, in both stores;
- :mod:`.local`: the in-process store, :class:`AdmissionLimiter`;
- :mod:`.redis_store`: the Redis store, :class:`RedisLimiter` (leases, GCRA rates, the shared
  hold and concurrency, the in-process fallback), its scripts in ``lua/``.
"""

from __future__ import annotations

from .local import AdmissionLimiter
from .redis_store import RedisLimiter

__all__ = ["AdmissionLimiter", "RedisLimiter"]
