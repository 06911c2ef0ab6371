"""What the Redis store keeps of one model lane in this process, and the permit of a lease.

A lane's keys (all beginning with :func:`lane_scope`), its configured limits in the numbers
the scripts take (GCRA intervals, a slot count), and what this process knows of the fleet's
learning for it; a :class:`RedisPermit` is one attempt's lease in the lane's slots.
"""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import quote

from .plan import paced_rate

__all__ = ["RedisLane", "RedisPermit", "gcra", "lane_scope"]


def gcra(per_minute: Optional[float], burst: float, margin: float) -> tuple[float, float]:
    """``(emission interval in ms, capacity)`` of a rate: the in-process bucket's numbers
    (:func:`.plan.paced_rate`); ``(0, 0)`` for no limit."""
    paced = paced_rate(per_minute, burst, margin)
    if paced is None:
        return 0.0, 0.0
    rate_per_s, capacity = paced
    return 1000.0 / rate_per_s, capacity


def lane_scope(base: str, model: Optional[str]) -> str:
    """The first part of every key of ``model``'s lane."""
    # "*" for calls without a model: a model of that name would be quoted to %2A.
    return f"{base}:model:{'*' if model is None else quote(model, safe='')}"


class RedisLane:
    """One model's keys and limits (the calls without a model share one lane)."""

    __slots__ = ("model", "label", "slots", "rpm", "tpm", "hold", "control", "pace",
                 "learned_tpm", "learned", "window", "max_concurrency", "rpm_gcra", "tpm_gcra",
                 "version", "shared", "mine", "counters", "active", "gap", "introduced")

    def __init__(self, base: str, model: Optional[str], max_concurrency: int,
                 rpm_gcra: tuple[float, float], tpm_gcra: tuple[float, float]) -> None:
        self.model = model
        self.label = model or "-"
        scope = lane_scope(base, model)
        self.slots = f"{scope}:slots"
        self.rpm = f"{scope}:rpm"
        self.tpm = f"{scope}:tpm"
        self.hold = f"{scope}:hold"
        self.control = f"{scope}:control"
        #: The fleet's learned send interval and token bucket (GCRA), and what it learned.
        self.pace = f"{scope}:pace"
        self.learned_tpm = f"{scope}:learned_tpm"
        self.learned = f"{scope}:learned"
        #: The fleet's admissions in the current window of a known window limit.
        self.window = f"{scope}:window"
        #: 0 when the lane needs no slots of its own (no model limit, not adaptive).
        self.max_concurrency = max_concurrency
        self.rpm_gcra = rpm_gcra
        self.tpm_gcra = tpm_gcra
        # What this process knows of the fleet's learning (guarded by the lock of
        # :class:`._fleet_learning.FleetLearning`):
        #: the version of ``learned`` last seen, its fields as last seen, and this process's
        #: own :meth:`AdaptiveControl.learned` as last published or adopted.
        self.version = 0
        self.shared: dict[str, Any] = {}
        self.mine: dict[str, Any] = {}
        #: The fleet's counters (sent, accepted, sent tokens, accepted tokens) last seen.
        self.counters: Optional[list[int]] = None
        #: Acquires under way plus leases held; ``gap``: it fell to 0 since the counters were
        #: last seen (what the fleet did meanwhile happened while this lane was idle).
        self.active = 0
        self.gap = False
        #: What the fleet learned was read before this process's first admission.
        self.introduced = False


class RedisPermit:
    """A lease in Redis; handed back to :meth:`.redis_store.RedisLimiter.release` once."""

    __slots__ = ("id", "lane", "cost", "answer_reserved", "admitted_at", "released", "paced",
                 "learned_tpm_interval", "fleet_level", "window_rank")

    def __init__(self, permit_id: str, lane: RedisLane, cost: int, admitted_at: str,
                 paced: Any = None, answer_reserved: int = 0,
                 learned_tpm_interval: float = 0.0, fleet_level: int = 0,
                 window_rank: int = 0) -> None:
        self.id = permit_id
        self.lane = lane
        self.cost = cost
        #: ``max_tokens`` of the request: providers charge at least that for the answer.
        self.answer_reserved = answer_reserved
        #: The permit of this process's pacer (adaptive mode), released with the lease.
        self.paced = paced
        #: Redis' time of admission (ms), to tell a new 429 from an echo of the last cut.
        self.admitted_at = admitted_at
        #: The fleet's learned token interval (ms) it was charged at, refunded at the same.
        self.learned_tpm_interval = learned_tpm_interval
        #: The fleet's attempts of the lane in flight when it was admitted, itself included.
        self.fleet_level = fleet_level
        #: Its place among the fleet's admissions in a known window (1 for the first; 0: no
        #: window known).
        self.window_rank = window_rank
        self.released = False

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<redis_limiter lease model={self.lane.label} tokens={self.cost} {state}>"
