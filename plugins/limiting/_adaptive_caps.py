"""Caps on calls in flight, as :class:`~.adaptive.AdaptiveControl` meets them.

A worded cap (a 429 saying "parallel" or "concurrent") sets a ceiling one below the refused
level at once; an unworded one is inferred from :data:`~.adaptive.CAP_EVIDENCE` refusals in a
row, each with more calls in flight than any accepted call had, and what those refusals taught
as a rate is undone.
"""

from __future__ import annotations

import logging
from typing import Optional

from cometkit import AttemptResult
from cometkit.hints import RateLimitHints

from ._adaptive_constants import CAP_EVIDENCE

logger = logging.getLogger("cometkit.limiter")


class InFlightCaps:
    """Mixin of :class:`~.adaptive.AdaptiveControl`: the ceiling on calls in flight.

    State lives in ``AdaptiveControl.__init__``. Writes ``ceiling``, ``limit``,
    ``_ok_since_ceiling``, ``_slow_start``, ``_cap_evidence``, ``_cap_inferred``,
    ``_rate_before_evidence``, ``rate_per_s``, ``_anchor_rate``, ``_learn_pending``,
    ``hold_until`` and ``_half_open``; also reads ``_max_ok_level`` and ``rate_floor_per_s``
    and calls ``allowed`` and ``accepting``.
    """

    def _above_accepted(self, hints: RateLimitHints, in_flight: Optional[int],
                        now: float, echo: bool) -> bool:
        """Whether this unworded 429 reads as a cap on calls in flight: sent with more in
        flight than any accepted call had, for the :data:`CAP_EVIDENCE`-th signal in a row (or
        once such a cap was inferred), while the server accepts fewer. Echoes of one burst
        count once: a slow start meets any limit at its highest level so far."""
        if hints.refusal is not None or in_flight is None or self._max_ok_level < 1:
            return False
        if in_flight <= self._max_ok_level or not self.accepting(now):
            self._cap_evidence = 0  # refused where it also accepts: a rate, not a cap
            return False
        if not echo:
            if self._cap_evidence == 0:
                self._rate_before_evidence = self.rate_per_s
            self._cap_evidence += 1
        if self._cap_inferred:
            return True
        if self._cap_evidence < CAP_EVIDENCE:
            return False
        logger.info("429s only with more than %d calls in flight: taken for a cap on calls "
                    "in flight", self._max_ok_level)
        self._cap_inferred = True
        # The refusals so far were read as a rate: undo what they taught (a send rate, a
        # hold, the cuts) and keep just below the refused level instead.
        self.rate_per_s = self._rate_before_evidence
        if self.rate_per_s is None:
            self.rate_per_s = self.rate_floor_per_s
        self._anchor_rate = self.rate_per_s or 0.0
        self._learn_pending = False
        self.hold_until = min(self.hold_until, now)
        self._half_open = False
        self.limit = float(max(self.limit, self._max_ok_level))
        return True

    def _capped(self, result: AttemptResult, in_flight: Optional[int]) -> str:
        """A cap on calls in flight refused: stay one below the refused level, no hold."""
        level = in_flight if in_flight is not None else self.allowed()
        ceiling = max(1, min(level - 1, self.allowed()))
        if self.ceiling is None or ceiling < self.ceiling:
            logger.info("429 for model=%s: the server caps calls in flight; keeping at most %d",
                        result.request.model or "-", ceiling)
            self.ceiling = ceiling
        self.limit = min(self.limit, float(self.ceiling))
        self._ok_since_ceiling = 0
        self._slow_start = False
        return "concurrency"
