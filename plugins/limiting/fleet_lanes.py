"""Priority lanes across a fleet: the Redis store's queue of waiting calls by priority.

The in-process store orders its own waiters (:mod:`.local`); a fleet needs one picture of who
waits everywhere. Per model lane, Redis keeps the waiting attempts of every process in a
sorted set scored by priority rank, then by when the call began (its age, measured on its own
host, becomes a start in Redis' time, so hosts' clocks need not agree); an attempt held up by
a limit every model shares (the client's rates, its slots) is also in a client-wide set, as
the in-process store lets a call waiting for the client's limits hold up every model while a
call waiting for its own model's holds up that model only. Each entry has a heartbeat:
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

__all__ = ["FleetLanes", "FleetWaiter", "WAITER_TTL_S", "GO", "OVERTAKE", "WAIT"]

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
    def keys(lane_scope: str, client_scope: str) -> list[str]:
        """The keys of a model lane whose keys begin ``lane_scope`` (waiters, heartbeats,
        credit) and of its client's, beginning ``client_scope`` (waiters, heartbeats)."""
        return [f"{lane_scope}:waiting", f"{lane_scope}:waiting_seen",
                f"{lane_scope}:starvation_credit", f"{client_scope}:waiting",
                f"{client_scope}:waiting_seen"]

    def ask(self, keys: list[str], waiter_id: str, request: RequestInfo, *,
            shared: bool = False) -> int:
        """:data:`GO`, :data:`OVERTAKE` or :data:`WAIT` for ``request``'s next try (it is
        registered as waiting, or its heartbeat renewed; ``shared``: also among the waiters
        of the client-wide limits, which every model's lower lanes give way to)."""
        age_ms = max(0, int((self.clock.monotonic() - request.started_at) * 1000))
        reply = self._gate(keys=keys, args=[
            waiter_id, request.priority_rank, age_ms, self.waiter_ttl_ms, self.starvation_ms,
            RANK_SPAN_MS, 1 if shared else 0])
        return int(reply[0])

    def leave(self, keys: list[str], waiter_id: str, *, admitted: bool,
              overtook: bool = False) -> Optional[float]:
        """The waiter is admitted (``overtook``: by a :data:`OVERTAKE` answer) or gave up;
        returns the lower lanes' credit after it."""
        reply = self._leave(keys=keys, args=[
            waiter_id, 1 if admitted else 0, 1 if overtook else 0, self.starvation_share,
            int(CREDIT_TTL_S * 1000)])
        return float(reply)

    def waiter(self, keys: list[str], waiter_id: str, request: RequestInfo) -> FleetWaiter:
        """The fleet's view of one attempt waiting for admission."""
        return FleetWaiter(self, keys, waiter_id, request)


class FleetWaiter:
    """One attempt in the fleet's queues, from its first try to its admission (or giving up).

    ``shared`` becomes true once a limit every model shares refused it (:meth:`held_up`):
    from then on it is also among the client's waiters, which lower lanes of every model give
    way to.
    """

    __slots__ = ("lanes", "keys", "id", "request", "shared")

    def __init__(self, lanes: FleetLanes, keys: list[str], waiter_id: str,
                 request: RequestInfo) -> None:
        self.lanes = lanes
        self.keys = keys
        self.id = waiter_id
        self.request = request
        self.shared = False

    def turn(self) -> int:
        """:data:`GO`, :data:`OVERTAKE` or :data:`WAIT` for its next try."""
        return self.lanes.ask(self.keys, self.id, self.request, shared=self.shared)

    def held_up(self, by_client_limit: bool) -> None:
        """A try was refused; ``by_client_limit``: by a limit every model shares, so it joins
        the client's waiters at once (before it sleeps, or the other models' lower lanes would
        take the next turn meanwhile)."""
        if by_client_limit and not self.shared:
            self.shared = True
            self.lanes.ask(self.keys, self.id, self.request, shared=True)

    def leave(self, *, admitted: bool, overtook: bool = False) -> Optional[float]:
        return self.lanes.leave(self.keys, self.id, admitted=admitted, overtook=overtook)

