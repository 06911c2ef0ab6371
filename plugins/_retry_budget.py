"""The client-wide retry budget of the ``backoff`` policy: :class:`RetryBudget`.

Retries may add at most a share of the client's recent calls (plus a floor), so a server that
answers 429 to everything sees a bounded number of extra attempts instead of ``max_attempts``
times the traffic. Kept apart from the policy because it is a counter on its own (a sliding
window of calls and retries), which the policy only asks. Re-exported by
:mod:`cometkit_plugins.backoff`.
"""

from __future__ import annotations

import threading
from typing import Optional

from cometkit import Clock, SystemClock

__all__ = ["RetryBudget"]

#: Buckets the budget window is cut into: the window slides in steps of ``window / this``.
_BUDGET_BUCKETS = 10


class RetryBudget:
    """How many retries the client may still make: ``ratio`` × recent calls + ``floor``.

    Every call deposits (:meth:`deposit`), every retry withdraws (:meth:`try_withdraw`), both
    counted over the last ``window_s`` seconds in a ring of buckets, so the check costs a
    constant amount of memory and time. Within any window, retries never exceed
    ``ratio * calls + floor``: under a server that refuses everything, N calls make at most
    ``N * (1 + ratio) + floor`` attempts (plus ``floor`` per further window if the storm
    lasts longer), not ``N * max_attempts``. Thread-safe; one per client.
    """

    def __init__(self, ratio: float, floor: int, window_s: float,
                 clock: Optional[Clock] = None) -> None:
        if ratio < 0 or floor < 0 or window_s <= 0:
            raise ValueError("RetryBudget needs ratio >= 0, floor >= 0 and window_s > 0")
        self.ratio = float(ratio)
        self.floor = int(floor)
        self.window_s = float(window_s)
        self._clock = clock or SystemClock()
        self._width = self.window_s / _BUDGET_BUCKETS
        self._ticks = [-1] * _BUDGET_BUCKETS
        self._calls = [0] * _BUDGET_BUCKETS
        self._retries = [0] * _BUDGET_BUCKETS
        self._lock = threading.Lock()

    def _bucket(self, tick: int) -> int:
        """Index of the bucket for ``tick``, emptied first if it held an older tick."""
        index = tick % _BUDGET_BUCKETS
        if self._ticks[index] != tick:
            self._ticks[index] = tick
            self._calls[index] = 0
            self._retries[index] = 0
        return index

    def _totals(self, tick: int) -> tuple[int, int]:
        oldest = tick - _BUDGET_BUCKETS
        calls = retries = 0
        for index in range(_BUDGET_BUCKETS):
            if self._ticks[index] > oldest:
                calls += self._calls[index]
                retries += self._retries[index]
        return calls, retries

    def deposit(self) -> None:
        """A call started: it earns ``ratio`` of a retry."""
        tick = int(self._clock.monotonic() // self._width)
        with self._lock:
            self._calls[self._bucket(tick)] += 1

    def try_withdraw(self) -> bool:
        """Take one retry if the budget allows it; ``False`` (and nothing taken) if not."""
        tick = int(self._clock.monotonic() // self._width)
        with self._lock:
            index = self._bucket(tick)
            calls, retries = self._totals(tick)
            if retries + 1 > self.ratio * calls + self.floor:
                return False
            self._retries[index] += 1
            return True

    def counts(self) -> tuple[int, int]:
        """``(calls, retries)`` in the current window."""
        tick = int(self._clock.monotonic() // self._width)
        with self._lock:
            return self._totals(tick)

    def __repr__(self) -> str:
        return (f"RetryBudget(ratio={self.ratio!r}, floor={self.floor!r}, "
                f"window_s={self.window_s!r})")
