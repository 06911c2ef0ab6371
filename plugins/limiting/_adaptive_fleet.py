"""Sharing one lane's learning with a fleet of processes (:class:`~.adaptive.AdaptiveControl`).

A store that keeps a lane's learning for a fleet reads :meth:`FleetSharing.learned`, hands
other processes' learning to :meth:`FleetSharing.adopt`, and counts what the rest of the fleet
had accepted with :meth:`FleetSharing.accepted_elsewhere`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping


class FleetSharing:
    """Mixin of :class:`~.adaptive.AdaptiveControl`: what a fleet shares of one lane.

    State lives in ``AdaptiveControl.__init__``. Writes ``token_rate_per_s``,
    ``_token_anchor``, ``window_s``, ``window_aligned``, ``window_quota``, ``_quota_settled``,
    ``_window_adopted``, ``_window_end``, ``ceiling``, ``_ceiling_adopted``, ``limit``,
    ``_slow_start``, ``_epoch_ok``, ``_epoch_sent``, ``_epoch_sent_tokens``,
    ``_ok_since_signal`` and ``_run_ok``; also reads ``rate_per_s``, ``_anchor_rate``,
    ``_stated_token_rate``, ``_window_configured``, ``_run_started_at`` and ``max_limit``, and
    calls ``_set_rate``, ``_grow_rate`` and ``_tokens_accepted``.
    """

    def learned(self) -> dict[str, Any]:
        """What this lane has *learned*, for a store to share with other processes (see
        :meth:`adopt`): the send and token rates as last learned (not what they grew to
        since), a recognised window, and a ceiling on calls in flight. ``None`` for what it
        has not learned; a configured window is not learned and not shared."""
        learned_window = self.window_s is not None and not self._window_configured
        return {
            "rate_per_s": self._anchor_rate if self.rate_per_s is not None else None,
            "token_rate_per_s": (self._token_anchor if self.token_rate_per_s is not None
                                 else None),
            "window_s": self.window_s if learned_window else None,
            "window_aligned": self.window_aligned if learned_window else None,
            "window_quota": self.window_quota if learned_window else None,
            "window_settled": self._quota_settled if learned_window else None,
            "ceiling": self.ceiling,
        }

    def adopt(self, shared: Mapping[str, Any]) -> None:
        """Take in what another process of the fleet learned (its :meth:`learned`, or part of
        it). The rates are the fleet's (measured over what the whole fleet had accepted, see
        :meth:`accepted_elsewhere`), so they replace this lane's, growth starting afresh from
        them, as after a rate this lane learned itself. A window and a ceiling are taken only
        when this lane knows none (a process that met them knows its own better); once taken,
        they follow the fleet's: a newer quota or ceiling, and ``None`` for one the process
        that met it found wrong."""
        rate = shared.get("rate_per_s")
        if rate:
            self._set_rate(float(rate))
            self._slow_start = False
        token_rate = shared.get("token_rate_per_s")
        if token_rate:
            token_rate = max(1.0, float(token_rate))
            if self._stated_token_rate is not None:
                token_rate = min(token_rate, self._stated_token_rate)
            self.token_rate_per_s = self._token_anchor = token_rate
        window_s = shared.get("window_s")
        if window_s and self.window_s is None:
            self.window_s = float(window_s)
            self.window_aligned = bool(shared.get("window_aligned"))
            quota = shared.get("window_quota")
            self.window_quota = int(quota) if quota else None
            self._quota_settled = bool(shared.get("window_settled"))
            self._window_adopted = True
        elif "window_s" in shared and window_s is None and self._window_adopted:
            # The process that met it found it wrong (a hint that was a time left after all).
            self.window_s = self.window_quota = None
            self._window_end = -math.inf
            self._window_adopted = False
            self._quota_settled = False
        elif (shared.get("window_quota") and self.window_s is not None
              and not self._window_configured
              and (self._window_adopted or "window_s" not in shared
                   or abs(float(window_s or 0) - self.window_s) < 1e-3)):
            # one window, one quota for the fleet: the latest any process counted
            self.window_quota = int(shared["window_quota"])
        if (shared.get("window_settled") and self.window_s is not None
                and not self._window_configured
                and abs(float(shared.get("window_s") or self.window_s) - self.window_s) < 1e-3):
            self._quota_settled = True  # a refused rank somewhere in the fleet fixed it
        ceiling = shared.get("ceiling")
        if ceiling and (self.ceiling is None or self._ceiling_adopted):
            self.ceiling = max(1, min(int(ceiling), self.max_limit))
            self.limit = min(self.limit, float(self.ceiling))
            self._slow_start = False
            self._ceiling_adopted = True
        elif "ceiling" in shared and ceiling is None and self._ceiling_adopted:
            self.ceiling = None
            self._ceiling_adopted = False

    @property
    def window_quota_open(self) -> bool:
        """Whether a learned window's quota may still be found larger: no refused rank has
        fixed it yet (here or, once shared, anywhere in the fleet). Until then a call the
        quota turned away should look again soon, not sleep to the window's end: the quota
        rises with each accepted probe of one more."""
        return (self.window_s is not None and self.window_quota is not None
                and not self._quota_settled and not self._window_configured)

    def accepted_elsewhere(self, sent: int, accepted: int, sent_tokens: int = 0,
                           accepted_tokens: int = 0) -> None:
        """Attempts the rest of the fleet sent, and had accepted, while this lane was busy:
        counted in what the server accepted since the rate was last learned, so that what
        this lane measures and learns is the rate the server gives the *fleet* (which a store
        enforces fleet-wide), and growing the rates as this lane's own successes do."""
        self._epoch_sent += max(0, sent)
        self._epoch_sent_tokens += max(0, sent_tokens)
        if accepted > 0:
            self._epoch_ok += accepted
            self._ok_since_signal += accepted  # a refusal after them ends the fleet's run
            self._grow_rate(accepted)
            if self._run_started_at is not None:  # a window's quota is the fleet's
                self._run_ok += accepted
        self._tokens_accepted(accepted_tokens)
