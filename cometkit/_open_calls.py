"""Attempt records folded into calls: :class:`OpenCalls`, and a call's :class:`CallSplit`.

Everything that reads a run call by call -- the summary (:mod:`cometkit.summary`) and
``cometkit report --plot`` (:mod:`cometkit._plot`) -- folds the attempts of a ``request_id``
into one call here, so that both count calls and split their time the same way. Public as
:mod:`cometkit.summary` names.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

__all__ = ["CallSplit", "OpenCalls", "MAX_OPEN_CALLS"]

logger = logging.getLogger("cometkit.summary")

#: Calls whose final attempt has not been seen yet that are remembered at most; past it the
#: oldest are forgotten (only rows of killed runs stay open forever).
MAX_OPEN_CALLS = 65_536


def _us(seconds: Optional[float]) -> int:
    """Seconds as whole microseconds, the CSV's resolution (``None`` is 0)."""
    return round(float(seconds or 0.0) * 1e6)


class CallSplit(NamedTuple):
    """Where a call's time went, in whole microseconds (what the CSV holds): waiting for
    admission, on the wire, and in the retry policy's sleeps."""

    queue_us: int
    wire_us: int
    backoff_us: int

    @property
    def total_us(self) -> int:
        return self.queue_us + self.wire_us + self.backoff_us

    def plus(self, other: CallSplit) -> CallSplit:
        return CallSplit(self.queue_us + other.queue_us, self.wire_us + other.wire_us,
                         self.backoff_us + other.backoff_us)


class OpenCalls:
    """Attempt records folded into calls, for everything that reads a run call by call (the
    summary, ``cometkit report --plot``).

    A call is its ``request_id``; its attempts arrive in order, and the one whose outcome is
    ``ok`` or ``error`` ends it. Until then the time it spent so far is remembered here -- at
    most :data:`MAX_OPEN_CALLS` calls, past which the oldest are forgotten (only rows of killed
    runs stay open forever). Not thread-safe on its own.
    """

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: dict[str, CallSplit] = {}

    def __len__(self) -> int:
        return len(self._open)

    @staticmethod
    def split_of(record: Any) -> CallSplit:
        """One attempt's share of its call: its ``queue_s``, ``duration_s`` and the sleep after
        it (``retry_delay_s``)."""
        return CallSplit(_us(record.queue_s), _us(record.duration_s),
                         _us(record.retry_delay_s))

    def add(self, record: Any, split: Optional[CallSplit] = None) -> Optional[CallSplit]:
        """Count one attempt (whose :meth:`split_of` the caller may already hold).

        :returns: the whole call's split when ``record`` ends its call, else ``None`` (an
            attempt to be retried, or an unknown outcome, which ends nothing).
        """
        if split is None:
            split = self.split_of(record)
        outcome = record.outcome
        if outcome == "retry":
            open_calls = self._open
            before = open_calls.get(record.request_id)
            open_calls[record.request_id] = split if before is None else before.plus(split)
            if len(open_calls) > MAX_OPEN_CALLS:
                del open_calls[next(iter(open_calls))]
            return None
        if outcome in ("ok", "error"):
            before = self._open.pop(record.request_id, None)
            return split if before is None else before.plus(split)
        logger.debug("attempt of %s has unknown outcome %r: counted as an attempt only",
                     record.request_id, outcome)
        return None
