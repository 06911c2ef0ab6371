"""What the sandbox saw: attempts, outcomes, concurrency and connections.

Tests and benchmarks check a client against these server-side counts (did it retry exactly
so often, stay under its concurrency cap, reuse its connections?).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Optional, Union

__all__ = ["Counters"]

#: An answer's status code, or how the attempt ended without one (``reset``, ``truncated``,
#: ``aborted`` when the sandbox stopped mid-request).
Outcome = Union[int, str]


class Counters:
    """Thread-safe counters; :meth:`snapshot` returns plain dicts (JSON-friendly but for the
    integer status keys)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._in_flight_by_model: Counter = Counter()
        self.reset()

    def reset(self) -> None:
        """Zero the counters. Requests being served stay counted as in flight."""
        with self._lock:
            self._attempts = 0
            self._by_status: Counter = Counter()
            self._by_model: Counter = Counter()
            self._faults: Counter = Counter()
            self._rate_limited: Counter = Counter()
            self._max_in_flight = self._in_flight
            self._max_in_flight_by_model = {m: n for m, n in self._in_flight_by_model.items() if n}
            self._connections = 0

    def connection(self) -> None:
        with self._lock:
            self._connections += 1

    def begin(self) -> None:
        """An attempt arrived (call :meth:`end` when it is over)."""
        with self._lock:
            self._attempts += 1
            self._in_flight += 1
            if self._in_flight > self._max_in_flight:
                self._max_in_flight = self._in_flight

    def model(self, model: str) -> None:
        """The current attempt is for ``model`` (call :meth:`end` with it)."""
        with self._lock:
            self._by_model[model] += 1
            count = self._in_flight_by_model[model] = self._in_flight_by_model[model] + 1
            if count > self._max_in_flight_by_model.get(model, 0):
                self._max_in_flight_by_model[model] = count

    def fault(self, kind: str) -> None:
        with self._lock:
            self._faults[kind] += 1

    def rate_limited(self, kind: str) -> None:
        with self._lock:
            self._rate_limited[kind] += 1

    def end(self, outcome: Outcome, model: Optional[str]) -> None:
        with self._lock:
            self._by_status[outcome] += 1
            self._in_flight -= 1
            if model is not None:
                self._in_flight_by_model[model] -= 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "attempts": self._attempts,
                "attempts_by_status": dict(self._by_status),
                "requests_by_model": dict(self._by_model),
                "in_flight": self._in_flight,
                "max_in_flight_seen": self._max_in_flight,
                "max_in_flight_seen_by_model": dict(self._max_in_flight_by_model),
                "connections_accepted": self._connections,
                "faults_injected": dict(self._faults),
                "rate_limited": dict(self._rate_limited),
            }
