"""A token bucket measured against an injected clock: the one the ``limiter`` plugin admits
by, and the one the sandbox limits by (so the two agree on what a rate and a burst mean).

The bucket holds ``capacity`` tokens and refills at ``rate_per_s``. It never sleeps: it answers
*when* an amount will be available, so the limiter can wait on a condition with a computed
timeout (or a fake clock can jump straight there). It may go below zero: a request costing
more than the whole bucket is admitted once the bucket is full and leaves a debt that later
requests wait out, instead of never being admitted. Not thread-safe on its own: its owner's
lock guards it.
"""

from __future__ import annotations

import math

__all__ = ["TokenBucket"]

#: Float slack when comparing a refilled level with what is needed: waking at the computed
#: instant must admit, not compute a further wait of a few nanoseconds.
_EPSILON = 1e-9


class TokenBucket:
    """Tokens that refill continuously, starting full.

    :param rate_per_s: tokens added per second.
    :param capacity: most tokens held; what can be spent in a burst after a quiet spell.
    :param now: the clock's ``monotonic()`` at creation.
    """

    __slots__ = ("rate_per_s", "capacity", "level", "_updated")

    def __init__(self, rate_per_s: float, capacity: float, now: float) -> None:
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs rate_per_s > 0 and capacity > 0")
        self.rate_per_s = float(rate_per_s)
        self.capacity = float(capacity)
        self.level = self.capacity
        self._updated = now

    def refill(self, now: float) -> None:
        """Add what has dripped in since the last call (every other method does this too)."""
        if now > self._updated:
            self.level = min(self.capacity, self.level + (now - self._updated) * self.rate_per_s)
            self._updated = now

    def ready_at(self, amount: float, now: float) -> float:
        """When ``amount`` (at most the capacity) will be in the bucket: ``now`` if it is."""
        self.refill(now)
        need = min(amount, self.capacity)
        if self.level >= need - _EPSILON:
            return now
        return now + (need - self.level) / self.rate_per_s

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds from ``now`` until ``amount`` (at most the capacity) is in the bucket."""
        return self.ready_at(amount, now) - now

    def take(self, amount: float, now: float) -> None:
        """Spend ``amount``; the level may go negative (a debt later requests wait out)."""
        self.refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        """Return ``amount`` (or take more, when negative), never above the capacity."""
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)

    def remaining(self, limit: float, now: float) -> int:
        """The bucket's fill as a share of ``limit`` (a per-minute limit it enforces in
        shorter buckets, as ``x-ratelimit-remaining-*`` states it), floored."""
        self.refill(now)
        return max(0, math.floor(self.level / self.capacity * limit + _EPSILON))

    def to_full_s(self, now: float) -> float:
        """Seconds from ``now`` until the bucket is full again."""
        self.refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate_per_s)

    def __repr__(self) -> str:
        return (f"TokenBucket(rate_per_s={self.rate_per_s:g}, capacity={self.capacity:g}, "
                f"level={self.level:g})")
