"""The in-process store's queue of waiting attempts, in priority order, and its starvation
credit.

Waiters are queued by their priority lane (``RequestInfo.priority_rank``), then by when their
call began, so a call sent back by a 429 keeps its place. A lower lane is slowed, never
stopped: every admission adds ``starvation_share`` to the lower lanes' credit (at most one,
:func:`.plan.starvation_credit`), and with a whole credit the oldest waiter of a lower lane
that has waited ``starvation_s`` goes ahead of the higher lanes, spending one. Which waiter may
go is :class:`.local.AdmissionLimiter`'s; the queue only orders them.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from ._local_lanes import Waiter
from .plan import OVERTAKE_CREDIT, starvation_credit

__all__ = ["WaitQueue"]


class WaitQueue(deque):  # type: ignore[type-arg]
    """The waiters, highest lane and oldest call first (a deque of :class:`.Waiter`).

    :param starvation_share: the lower lanes' share of admissions.
    :param starvation_s: seconds a lower lane's call waits before it may overtake.
    """

    def __init__(self, starvation_share: float, starvation_s: float) -> None:
        super().__init__()
        self.starvation_share = starvation_share
        self.starvation_s = starvation_s
        #: What lower lanes may spend on overtaking (see :func:`.plan.starvation_credit`).
        self.credit = 0.0

    def enqueue(self, waiter: Waiter) -> None:
        """Queue a waiter by its priority lane, then by the age of its call: first come, first
        served within a lane, and a call sent back by a 429 keeps its place ahead of calls of
        its lane that began after it."""
        place = (waiter.rank, waiter.since)
        if not self or (self[-1].rank, self[-1].since) <= place:
            self.append(waiter)
            return
        for index, other in enumerate(self):
            if (other.rank, other.since) > place:
                self.insert(index, waiter)
                return
        self.append(waiter)

    def starving(self, now: float) -> Optional[Waiter]:
        """The waiter of a lower lane that goes ahead of the higher ones now, if any: the
        oldest call below the highest waiting lane that has waited ``starvation_s``, while
        the lower lanes have a whole credit to spend."""
        if self.credit < OVERTAKE_CREDIT or not self:
            return None
        top = self[0].rank
        oldest: Optional[Waiter] = None
        for waiter in self:
            if waiter.rank > top and now - waiter.since >= self.starvation_s and (
                    oldest is None or waiter.since < oldest.since):
                oldest = waiter
        return oldest

    def admitted(self) -> None:
        """One more admission (queued or not): the lower lanes' credit grows."""
        self.credit = starvation_credit(self.credit, self.starvation_share)

    def overtook(self) -> None:
        """A starving waiter went ahead of the higher lanes: it spent a whole credit."""
        self.credit -= 1.0
