"""Priority lanes across a fleet: the Redis store's queue of waiting calls by priority.

The in-process store orders its own waiters (:mod:`.local`); a fleet needs one picture of who
waits everywhere. Per model lane, Redis keeps the waiting attempts of every process in a
sorted set scored by priority rank, then by when the call began (its age, measured on its own
host, becomes a start in Redis' time, so hosts' clocks need not agree), each with a heartbeat:
a waiter asks ``lane_gate.lua`` before every try for admission, which renews it, and a
waiter not heard of for :data:`WAITER_TTL_S` -- its process was killed, say -- is forgotten,
so a crash never blocks the fleet for longer than that.

The gate refuses a try while a waiter of a higher lane waits anywhere, except for the
starving oldest waiter of the lower lanes when they have a whole credit: every admission while
others wait adds ``starvation_share`` to it (at most one), an admission that overtook spends
one, as the in-process store does (:func:`.plan.starvation_credit`). Uncontended traffic
leaves no key behind. Within a lane, tries are not ordered
across processes (the lease sets decide, as before).
"""

from __future__ import annotations

from typing import Any, Optional

from cometkit import Clock, RequestInfo

__all__ = ["FleetLanes", "WAITER_TTL_S", "GO", "OVERTAKE", "WAIT"]

#: Seconds a waiter stays known without asking again (waiters ask at least every second).
WAITER_TTL_S = 5.0
#: The lower lanes' credit is forgotten after this long without an admission.
CREDIT_TTL_S = 3600.0
#: Ranks are this many milliseconds apart in a waiter's score (a start in Redis' time is about
#: 1.8e12 ms; 1e13 keeps rank and start exact in a double for ranks up to several hundred).
RANK_SPAN_MS = 10 ** 13

#: The gate's answers: try, try ahead of a higher lane, do not try.
GO, OVERTAKE, WAIT = 1, 2, 0


class FleetLanes:
    """Asks Redis whether a waiting attempt's lane may try now, and says when it leaves.

    :param gate: the registered ``lane_gate.lua`` script.
    :param leave: the registered ``lane_leave.lua`` script.
    :param starvation_share: the lower lanes' share of admissions (see the limiter options).
    :param starvation_s: seconds a lower lane's call waits before it may overtake.
    :param clock: the clock a call's age is read on (its ``started_at`` is on it).
    :param waiter_ttl_s: seconds a waiter stays known without asking again.
    """

    def __init__(self, gate: Any, leave: Any, *, starvation_share: float, starvation_s: float,
                 clock: Clock, waiter_ttl_s: float = WAITER_TTL_S) -> None:
        self._gate = gate
        self._leave = leave
        self.starvation_share = starvation_share
        self.starvation_ms = int(starvation_s * 1000)
        self.clock = clock
        self.waiter_ttl_ms = max(1, int(waiter_ttl_s * 1000))

    @staticmethod
    def keys(scope: str) -> list[str]:
        """The waiters, heartbeats and credit keys of the lane whose keys begin ``scope``."""
        return [f"{scope}:waiting", f"{scope}:waiting_seen", f"{scope}:starvation_credit"]

    def ask(self, keys: list[str], waiter_id: str, request: RequestInfo) -> int:
        """:data:`GO`, :data:`OVERTAKE` or :data:`WAIT` for ``request``'s next try (it is
        registered as waiting, or its heartbeat renewed)."""
        age_ms = max(0, int((self.clock.monotonic() - request.started_at) * 1000))
        reply = self._gate(keys=keys, args=[
            waiter_id, request.priority_rank, age_ms, self.waiter_ttl_ms, self.starvation_ms,
            RANK_SPAN_MS])
        return int(reply[0])

    def leave(self, keys: list[str], waiter_id: str, *, admitted: bool,
              overtook: bool = False) -> Optional[float]:
        """The waiter is admitted (``overtook``: by a :data:`OVERTAKE` answer) or gave up;
        returns the lower lanes' credit after it."""
        reply = self._leave(keys=keys, args=[
            waiter_id, 1 if admitted else 0, 1 if overtook else 0, self.starvation_share,
            int(CREDIT_TTL_S * 1000)])
        return float(reply)
