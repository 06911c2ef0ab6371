"""Quantiles of durations in bounded memory: :class:`LatencySketch`, a log-bucket histogram.

The summary (:mod:`cometkit.summary`) keeps one per model for call latency and one for queue
time, so that its p50 / p95 / p99 are within 1 % whatever the number of calls, in a few
kilobytes. Public as :class:`cometkit.summary.LatencySketch`.
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["LatencySketch"]


class LatencySketch:
    """Quantiles of durations in bounded memory (a DDSketch-style log-bucket histogram).

    A duration ``v`` falls into bucket ``ceil(log(v) / log(gamma))`` with
    ``gamma = (1 + a) / (1 - a)``; every value in a bucket is within a relative error ``a`` of
    the bucket's representative ``2 * gamma**i / (gamma + 1)``, so each reported quantile is
    within :attr:`RELATIVE_ACCURACY` (1 %) of the true nearest-rank quantile. Durations are
    clamped to [1 µs, 10**6 s] (below 1 µs reads as 0), which caps the sketch at about 1,400
    buckets whatever the number of values. Quantiles are also clamped to the exact minimum and
    maximum seen. Not thread-safe on its own: :class:`Summary` locks around it.
    """

    RELATIVE_ACCURACY = 0.01
    _GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
    _LOG_GAMMA = math.log(_GAMMA)
    MIN_S = 1e-6
    MAX_S = 1e6

    __slots__ = ("_buckets", "_zero", "count", "min_s", "max_s")

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self._zero = 0
        self.count = 0
        self.min_s = math.inf
        self.max_s = -math.inf

    def add(self, seconds: float) -> None:
        if not seconds == seconds:  # NaN carries no information
            return
        self.count += 1
        if seconds < self.min_s:
            self.min_s = seconds
        if seconds > self.max_s:
            self.max_s = seconds
        if seconds < self.MIN_S:
            self._zero += 1
            return
        index = math.ceil(math.log(min(seconds, self.MAX_S)) / self._LOG_GAMMA)
        self._buckets[index] = self._buckets.get(index, 0) + 1

    def quantile(self, q: float) -> Optional[float]:
        """The nearest-rank ``q`` quantile (0 < q <= 1), or ``None`` with no values."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count - 1e-9))
        seen = self._zero
        if seen >= rank:
            return max(0.0, self.min_s)
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                estimate = 2.0 * self._GAMMA**index / (self._GAMMA + 1.0)
                return min(max(estimate, self.min_s), self.max_s)
        return self.max_s  # pragma: no cover - ranks never exceed count
