"""Send-rate and token-rate learning of :class:`~.adaptive.AdaptiveControl`.

What the server accepted since the rate was last learned becomes the new rate (not below
:data:`~.adaptive.RATE_FLOOR` of the refused one), a configured floor holds until the server
keeps refusing at it, and the learned rates grow per success. The same rules serve the token
rate, counted in tokens, and a token limit the server states caps it.
"""

from __future__ import annotations

import logging
from typing import Optional

from ._adaptive_constants import (
    FLOOR_REFUSALS,
    MIN_MEASURE_S,
    MIN_RATE_PER_S,
    MIN_SENT_SPAN_S,
    RATE_ACCELERATION_PER_S,
    RATE_BACKOFF,
    RATE_FLOOR,
    RATE_GROWTH_PER_S,
)

logger = logging.getLogger("cometkit.limiter")


class RateLearning:
    """Mixin of :class:`~.adaptive.AdaptiveControl`: learning and growing the rates.

    State lives in ``AdaptiveControl.__init__``. Writes ``rate_per_s``, ``_anchor_rate``,
    ``rate_floor_per_s``, ``_floor_refusals``, ``_learn_pending``, ``_epoch_ok``,
    ``_epoch_sent``, ``_epoch_busy_start``, ``token_rate_per_s``, ``_token_anchor``,
    ``_stated_token_rate``, ``_token_learn_pending``, ``_epoch_ok_tokens``,
    ``_epoch_sent_tokens`` and ``_token_epoch_busy_start``; also reads ``_rate_at_signal``,
    ``_token_rate_at_signal``, ``_busy``, ``_busy_s`` and calls ``note_demand``.
    """

    def _grow_rate(self, successes: int) -> None:
        """The learned rate rises per success, by the share of a second of sending it took."""
        if self.rate_per_s is not None:
            growth_per_s = (RATE_GROWTH_PER_S * self._anchor_rate
                            + RATE_ACCELERATION_PER_S * (self.rate_per_s - self._anchor_rate))
            self.rate_per_s += successes * growth_per_s / self.rate_per_s

    def _learn_rate(self, now: float) -> None:
        """Send at what the server accepted since the rate was last learned.

        Not below :data:`RATE_FLOOR` of the refused rate; and when the server accepted more
        than we were sending (a burst it had saved), or too little time has passed to tell,
        at :data:`RATE_BACKOFF` of the refused rate instead. The measurement keeps running
        until it spans :data:`MIN_MEASURE_S`, across as many signals as that takes.
        """
        self._learn_pending = False
        measured = self._measured_rate(now)
        before = self._rate_at_signal
        if measured is not None and (before is None or measured <= before):
            self._set_rate(measured if before is None else max(measured, before * RATE_FLOOR))
        elif before is not None:
            self._set_rate(before * RATE_BACKOFF)
        elif self._epoch_sent:  # the first signal came quickly: back off from what we sent
            busy_s = self._busy_s - self._epoch_busy_start
            self._set_rate(RATE_BACKOFF * self._epoch_sent / max(busy_s, MIN_SENT_SPAN_S))
        logger.debug("send rate %s/s (measured %s)",
                     "-" if self.rate_per_s is None else f"{self.rate_per_s:.2f}",
                     "-" if measured is None else f"{measured:.2f}/s")
        if measured is not None:
            self._epoch_ok = self._epoch_sent = 0
            self._epoch_busy_start = self._busy_s

    def _measured_rate(self, now: float) -> Optional[float]:
        """Successes per busy second since the rate was last learned (``None`` if too few)."""
        self.note_demand(now, self._busy)
        busy_s = self._busy_s - self._epoch_busy_start
        if not self._epoch_ok or busy_s < MIN_MEASURE_S:
            return None
        return self._epoch_ok / busy_s

    def refused_at_floor(self) -> None:
        """The limiter saw a refusal at the configured rate with its burst already smallest:
        after :data:`FLOOR_REFUSALS` of them the server evidently allows less, so the floor
        goes."""
        self._floor_refusals += 1
        if self._floor_refusals >= FLOOR_REFUSALS and self.rate_floor_per_s is not None:
            logger.info("the server keeps refusing at the configured rate (%.2f/s): learning a "
                        "lower one", self.rate_floor_per_s)
            self.rate_floor_per_s = None

    def adopt_token_rate(self, rate_per_s: float) -> None:
        """The server states its token limit: spend tokens at that rate from now on (a token
        refusal can still teach a lower one). A stated value seen again changes nothing."""
        if self._stated_token_rate is not None and abs(rate_per_s - self._stated_token_rate) \
                <= 1e-6 * rate_per_s:
            return
        self._stated_token_rate = rate_per_s
        self.token_rate_per_s = self._token_anchor = rate_per_s

    def _tokens_accepted(self, charged: int) -> None:
        """An accepted call's tokens: measured, and the learned token rate grows by them."""
        if charged <= 0:
            return
        self._epoch_ok_tokens += charged
        rate = self.token_rate_per_s
        if rate is not None:  # growth per second of sending, as for the send rate
            growth_per_s = (RATE_GROWTH_PER_S * self._token_anchor
                            + RATE_ACCELERATION_PER_S * (rate - self._token_anchor))
            rate += growth_per_s * charged / rate
            if self._stated_token_rate is not None:  # what the server states is a ceiling
                rate = min(rate, self._stated_token_rate)
            self.token_rate_per_s = rate

    def _learn_token_rate(self, now: float) -> None:
        """Spend tokens at what the server accepted since the token rate was last learned;
        the same rules as :meth:`_learn_rate`, counted in tokens."""
        self._token_learn_pending = False
        self.note_demand(now, self._busy)
        busy_s = self._busy_s - self._token_epoch_busy_start
        before = self._token_rate_at_signal
        measured = (self._epoch_ok_tokens / busy_s
                    if self._epoch_ok_tokens and busy_s >= MIN_MEASURE_S else None)
        if measured is not None and (before is None or measured <= before):
            rate = measured if before is None else max(measured, before * RATE_FLOOR)
        elif before is not None:
            rate = before * RATE_BACKOFF
        elif self._epoch_sent_tokens:
            rate = RATE_BACKOFF * self._epoch_sent_tokens / max(busy_s, MIN_SENT_SPAN_S)
        else:
            return
        self.token_rate_per_s = self._token_anchor = max(1.0, rate)
        logger.debug("token rate %.0f/s (measured %s)", self.token_rate_per_s,
                     "-" if measured is None else f"{measured:.0f}/s")
        if measured is not None:
            self._epoch_ok_tokens = self._epoch_sent_tokens = 0
            self._token_epoch_busy_start = self._busy_s

    def _set_rate(self, rate: float) -> None:
        rate = max(MIN_RATE_PER_S, rate)
        if self.rate_floor_per_s is not None:
            rate = max(rate, self.rate_floor_per_s)
        self.rate_per_s = self._anchor_rate = rate
