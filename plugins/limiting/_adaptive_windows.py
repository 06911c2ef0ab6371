"""Holds and window recognition of :class:`~.adaptive.AdaptiveControl`.

How long a refusal holds the lane, and what the hints and acceptances say about windows: a
``Retry-After`` repeated on refusals seconds apart is a fixed window's period, acceptance that
comes back when the wall-clock minute turns is a calendar minute, and where a fleet counts a
window's admissions, a refused or accepted rank fixes or raises its quota.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

from cometkit import AttemptResult
from cometkit.hints import RateLimitHints

from ._adaptive_constants import (
    DEFAULT_HOLD_S,
    HOLD_GROWTH,
    MAX_HOLD_S,
    MIN_PERIOD_S,
    MINUTE_AFTER_PROBES,
    MINUTE_SLACK_S,
    PERIOD_EVIDENCE_S,
    WINDOW_SLACK_S,
)

logger = logging.getLogger("cometkit.limiter")


class WindowRecognition:
    """Mixin of :class:`~.adaptive.AdaptiveControl`: holds, windows and their quotas.

    State lives in ``AdaptiveControl.__init__``. Writes ``window_s``, ``window_aligned``,
    ``window_quota``, ``_quota_settled``, ``_window_end``, ``_window_admitted``,
    ``_run_started_at``, ``_run_ok``, ``_last_hint``, ``_last_hint_at``, ``_failed_probes``,
    ``_minute_probe`` and ``_half_open``; also reads ``_window_configured``, ``_wall_offset``
    and ``_ok_since_signal``.
    """

    def _open_window(self, now: float) -> None:
        """A new window starts with this admission (or at the wall-clock boundary)."""
        assert self.window_s is not None
        self._window_admitted = 0
        self._run_started_at = now
        self._run_ok = 0
        self._window_end = now + self.window_s + WINDOW_SLACK_S
        if self.window_aligned and self._wall_offset is not None:
            wall = now + self._wall_offset
            self._window_end = (now + self.window_s - wall % self.window_s) + WINDOW_SLACK_S

    def _window_ranked(self, result: AttemptResult, rank: int, hints: RateLimitHints) -> None:
        """The quota of a learned window, from where in the fleet's window this answer's
        attempt went out (see :meth:`on_result`). A refused rank fixes the quota (one less);
        until one has, the last rank a window allowed, accepted, is taken for one short of
        the quota: the quota first learned counts the fleet's acceptances as far as this
        process had heard of them, which may be too few, and a quota never tried cannot be
        found too small (one refusal, once, settles it)."""
        if result.status_code == 429 and hints.refusal in (None, "requests"):
            if self.window_quota is None or rank - 1 < self.window_quota:
                self.window_quota = max(1, rank - 1)
            self._quota_settled = True
        elif result.accepted and self.window_quota is not None:
            if rank > self.window_quota:
                self.window_quota = rank
            if rank == self.window_quota and not self._quota_settled:
                self.window_quota = rank + 1

    def _hold_for(self, hint: Optional[float], now: float, probe: bool,
                  kind: str) -> tuple[float, str]:
        """How long to hold after this refusal, and whether it showed a window."""
        wall = now + (self._wall_offset or 0.0)
        if probe:
            self._failed_probes += 1
        if hint is None:
            self._last_hint = None
            hold = (DEFAULT_HOLD_S * HOLD_GROWTH ** self._failed_probes
                    if self._failed_probes < MINUTE_AFTER_PROBES else MAX_HOLD_S)
            to_minute = 60.0 - wall % 60.0 + MINUTE_SLACK_S
            self._minute_probe = to_minute <= hold
            return min(hold, to_minute), ("window" if self.window_s is not None else kind)
        if probe and self._failed_probes > 1:
            # A probe refused again: the hint was not enough; probe ever more rarely.
            hint = max(hint, DEFAULT_HOLD_S * HOLD_GROWTH ** min(self._failed_probes - 1, 8))
        repeated = (self._last_hint is not None and abs(hint - self._last_hint) < 1e-3
                    and now - self._last_hint_at >= PERIOD_EVIDENCE_S
                    and hint >= MIN_PERIOD_S)
        self._last_hint, self._last_hint_at = hint, now
        if (not repeated and self.window_s is not None and not self._window_configured
                and abs(hint - self.window_s) >= 1e-3):
            logger.info("Retry-After %g s after a window of %g s was assumed: the hint is a "
                        "time left after all", hint, self.window_s)
            self.window_s = self.window_quota = None
            self._window_end = -math.inf
            self._quota_settled = False
        # A long hint that ends a run of acceptances is taken for a window's length until a
        # different hint says otherwise (then it was a time left, and one probe went early).
        tentative = (self.window_s is None and hint >= MIN_PERIOD_S and not probe
                     and abs(hint - round(hint)) < 1e-6  # windows are whole seconds
                     and self._ok_since_signal > 0 and self._run_started_at is not None)
        if (repeated or tentative) and not self._window_configured:
            if self.window_s != hint:
                logger.info("Retry-After %g s after a run of acceptances%s: taken for a window "
                            "of that length, counted from its first request", hint,
                            " (repeated)" if repeated else "")
            self.window_s, self.window_aligned = hint, False
        if self.window_s is not None and self._run_started_at is not None:
            end = self._run_started_at + self.window_s + WINDOW_SLACK_S
            if end > now:
                self._window_end = end
                return min(MAX_HOLD_S, end - now), "window"
        return min(MAX_HOLD_S, hint), kind

    def _reopen(self, now: float, sent_at: float) -> None:
        """The probe (or a later attempt) was accepted: the limit is open again."""
        self._half_open = False
        if (self._minute_probe and self.window_s is None and not self._window_configured
                and self._failed_probes > 0):
            logger.info("acceptance came back when the wall-clock minute turned: a limit per "
                        "calendar minute")
            self.window_s, self.window_aligned = 60.0, True
            self.window_quota = self._run_ok or None
        self._failed_probes = 0
        self._minute_probe = False
        if self.window_s is not None:
            previous_ok = self._run_ok
            if now >= self._window_end or self._window_end == -math.inf:
                self._open_window(sent_at)
                self._window_admitted = 1
                self._run_ok = 1
            if self.window_quota is None and previous_ok > 1:
                self.window_quota = previous_ok
        else:
            self._run_started_at = sent_at
            self._run_ok = 1
