"""One limiting plan, two stores.

The ``limiter`` and ``redis_limiter`` plugins are thin: each declares its options and builds its
limiter. What they enforce is written once, here:

- :mod:`.plan`: the options, the token estimate, the settings both stores keep
  (:class:`~.plan.PlanSettings`) and the arithmetic of rates, lane caps and token charges that
  both stores share (the token bucket itself is the core's ``cometkit.buckets``);
- :mod:`.adaptive`: the adaptive policy (concurrency, send and token rates, holds, half-open
  probes, windows, caps on calls in flight), one object per model lane, in both stores, with
  its parts as mixins: rate learning (:mod:`._adaptive_rates`), holds and windows
  (:mod:`._adaptive_windows`), caps on calls in flight (:mod:`._adaptive_caps`), sharing with a
  fleet (:mod:`._adaptive_fleet`), and its tuned numbers (:mod:`._adaptive_constants`);
- :mod:`.local`: the in-process store, :class:`AdmissionLimiter`, with its lanes and permits
  (:mod:`._local_lanes`) and its priority queue (:mod:`._local_queue`);
- :mod:`.redis_store`: the Redis store, :class:`RedisLimiter`, which picks Redis or the
  fallback, with one module per job: admission through the Lua scripts
  (:mod:`._redis_admission`; the scripts are files in ``lua/``, loaded by
  :mod:`._redis_scripts`), the leases and their renewal (:mod:`._redis_leases`), the fallback
  when Redis is unreachable (:mod:`._redis_fallback`), what the fleet learned
  (:mod:`._fleet_learning`), a lane's keys (:mod:`._redis_lanes`), the options and the Redis
  client (:mod:`._redis_config`) and the priority lanes across the fleet (:mod:`.fleet_lanes`).
"""

from __future__ import annotations

from .local import AdmissionLimiter
from .redis_store import RedisLimiter

__all__ = ["AdmissionLimiter", "RedisLimiter"]
