"""The only things tests fake: the clock and randomness (everything else is real)."""

from __future__ import annotations

import threading

EPOCH = 1_700_000_000.0


class FakeClock:
    """Time that moves only when told to (or when something sleeps). Thread-safe; records
    every sleep so tests can assert exact backoff delays without waiting for them."""

    def __init__(self, monotonic: float = 1000.0, epoch: float = EPOCH) -> None:
        self.now = monotonic
        self.epoch = epoch
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch + self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class FixedRandom:
    """``uniform(a, b)`` always lands at the same fraction of the interval."""

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction

    def random(self) -> float:
        return self.fraction
