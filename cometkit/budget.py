"""A batch's budget: a ceiling on the tokens, or the US dollars, that its answers may cost.

The spend is known only from each answer's ``usage``, after the fact; a budget that only
counted answers would overshoot by everything in flight when it ran out. So a request is
*reserved* before it is sent, at its estimate -- the prompt (:func:`cometkit.tokens.estimate_parts`,
corrected by what this model's answers showed the estimate to be worth) plus its
``max_tokens``, or without one the longest answer of the model so far -- and *settled* with its
real usage when it ends. A request is sent only while what was spent, plus what is reserved,
plus its own estimate stays within the budget:

- when it would pass the budget even with nothing in flight, the budget is *reached*: no
  request is sent after it (the next run resumes at exactly this request);
- when only the reservations of calls in flight stand in its way, it waits for them to settle
  (they often spend less than reserved) and is decided again;
- until a model has answered once, a request of it without ``max_tokens`` has no estimate of
  its answer: it is sent only when nothing else is in flight, so the first answer teaches the
  estimate before the budget is committed to many of them.

What it can still overshoot by is the estimates' error on the calls in flight, never a whole
window of calls. The budget covers the whole job: what earlier runs spent into the same output
(:meth:`Budget.add_earlier`) counts, so rerunning a stopped batch with the same budget sends
nothing more, and a higher budget goes on from where it stopped.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from ._exceptions import ConfigError
from .prices import PriceTable, format_usd
from .tokens import estimate_parts

__all__ = ["Budget", "Reservation", "Spend"]

#: How often a request waiting for calls in flight to settle checks whether the run stopped.
WAIT_STEP_S = 0.25


@dataclass(frozen=True)
class Spend:
    """Tokens and what they cost (``cost_usd`` counts only when the budget has a cost cap)."""

    tokens: int = 0
    cost_usd: float = 0.0

    def plus(self, other: Spend) -> Spend:
        return Spend(self.tokens + other.tokens, self.cost_usd + other.cost_usd)

    def minus(self, other: Spend) -> Spend:
        return Spend(self.tokens - other.tokens, self.cost_usd - other.cost_usd)


@dataclass(frozen=True)
class Reservation:
    """What one admitted request was reserved at, until :meth:`Budget.settle`."""

    model: Optional[str]
    spend: Spend
    #: The prompt estimate before any correction, to learn how far off it was.
    prompt_estimate: int


class _ModelHistory:
    """What this model's settled answers taught: the prompt estimate's worth, and the longest
    answer (reserving the longest, not the mean, keeps a budget from being passed by answers
    that run longer than the mean)."""

    __slots__ = ("longest_answer", "input_tokens", "prompt_estimates")

    def __init__(self) -> None:
        self.longest_answer: Optional[int] = None
        self.input_tokens = 0
        self.prompt_estimates = 0

    def prompt_tokens(self, estimate: int) -> int:
        if not self.prompt_estimates:
            return estimate
        return math.ceil(estimate * self.input_tokens / self.prompt_estimates)

    def answer_tokens(self) -> Optional[int]:
        return self.longest_answer


class Budget:
    """A ceiling on what a batch spends: total tokens (input + output), US dollars, or both.

    Thread-safe: the runner's thread admits, the workers settle. One budget serves one run.

    :param max_total_tokens: input plus output tokens the whole job may spend.
    :param max_cost_usd: US dollars the whole job may spend, at ``prices``.
    :param prices: what tokens cost per model (the configuration's ``prices:``).
    :param prices_where: the configuration file ``prices`` came from, for errors.
    :raises ValueError: no limit, or a limit that is not a positive number.
    """

    def __init__(self, *, max_total_tokens: Optional[int] = None,
                 max_cost_usd: Optional[float] = None, prices: Optional[PriceTable] = None,
                 prices_where: str = "<defaults>") -> None:
        if max_total_tokens is None and max_cost_usd is None:
            raise ValueError("a budget needs max_total_tokens, max_cost_usd or both")
        if max_total_tokens is not None and (isinstance(max_total_tokens, bool) or not isinstance(
                max_total_tokens, int) or max_total_tokens < 1):
            raise ValueError(f"max_total_tokens must be a whole number >= 1, got "
                             f"{max_total_tokens!r}")
        if max_cost_usd is not None and (isinstance(max_cost_usd, bool) or not isinstance(
                max_cost_usd, (int, float)) or not math.isfinite(max_cost_usd)
                or max_cost_usd <= 0):
            raise ValueError(f"max_cost_usd must be a number of US dollars > 0, got "
                             f"{max_cost_usd!r}")
        self.max_total_tokens = max_total_tokens
        self.max_cost_usd = None if max_cost_usd is None else float(max_cost_usd)
        self.prices = prices if prices is not None else PriceTable()
        self.prices_where = prices_where
        self._changed = threading.Condition()
        #: Spent by earlier runs into the same output (:meth:`add_earlier`).
        self.earlier = Spend()
        #: Spent by this run's settled requests.
        self.this_run = Spend()
        self._reserved = Spend()
        self._in_flight = 0
        self._history: dict[Optional[str], _ModelHistory] = {}
        #: Set once a request would have passed the budget: none is admitted after it.
        self.reached = False

    # -- setting up ---------------------------------------------------------------------------

    def check_prices(self, models: Iterable[Optional[str]], *, sent_from: str = "") -> None:
        """Refuse a cost budget for a model without a price, before anything is sent.

        :param sent_from: where the models come from (the input file), for the message.
        :raises ConfigError: naming the model, the configuration file and the key to add.
        """
        if self.max_cost_usd is None:
            return
        missing = sorted({m or "(an answer naming no model)" for m in models
                          if self.prices.price_of(m) is None})
        if not missing:
            return
        where = self.prices_where
        file_note = "" if not where.startswith("<") else (
            " (no configuration file was given: pass one with --config)")
        first = missing[0]
        source = f" in {sent_from}" if sent_from else ""
        raise ConfigError(
            f"{where}: prices.{first}: no price for model {first!r}{source}, and a cost "
            f"budget (--max-cost) needs the price of every model it sends to"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
            + f"{file_note}. Add it: prices: {{{first}: {{input: <USD per million input "
            "tokens>, output: <USD per million output tokens>}}. Nothing was sent.",
            path=None if where.startswith("<") else where, key=f"prices.{first}")

    def add_earlier(self, usage_by_model: Mapping[Optional[str], tuple[int, int, int]]
                    ) -> None:
        """Count what earlier runs spent: ``model -> (longest answer, input tokens, output
        tokens)`` of the answers already in the output (the longest answer is learned too)."""
        with self._changed:
            for model, (longest, input_tokens, output_tokens) in usage_by_model.items():
                self.earlier = self.earlier.plus(self._spend(model, input_tokens,
                                                             output_tokens))
                self._learn(model, None, 0, longest)

    # -- the life of one request --------------------------------------------------------------

    def admit(self, body: Mapping[str, Any], *, stopping: Callable[[], bool] = lambda: False,
              ) -> Optional[Reservation]:
        """Reserve ``body``'s estimate, waiting for calls in flight to settle while only their
        reservations stand in its way.

        :returns: the reservation to :meth:`settle`; ``None`` when the budget is reached (see
            :attr:`reached`) or ``stopping()`` became true while it waited.
        """
        model = body.get("model") if isinstance(body.get("model"), str) else None
        prompt_estimate, answer_reserved = estimate_parts(body)
        with self._changed:
            while not stopping():
                history = self._history.get(model) or _ModelHistory()
                answer = answer_reserved or history.answer_tokens()
                sure = answer is not None
                need = self._spend(model, history.prompt_tokens(prompt_estimate), answer or 0)
                spent = self.earlier.plus(self.this_run)
                if not self._fits(spent.plus(need)):
                    self.reached = True
                    return None
                if self._fits(spent.plus(self._reserved).plus(need)) and (
                        sure or self._in_flight == 0):
                    self._reserved = self._reserved.plus(need)
                    self._in_flight += 1
                    return Reservation(model, need, prompt_estimate)
                self._changed.wait(WAIT_STEP_S)  # a call in flight settles, or we look again
            return None

    def settle(self, reservation: Reservation, usage: Optional[tuple[Optional[int],
                                                                     Optional[int]]],
               *, answered: bool) -> None:
        """Replace ``reservation`` with what the request really spent.

        :param usage: ``(input, output)`` tokens from the answer's ``usage``; ``None`` when it
            had none.
        :param answered: the request got a successful answer. One without ``usage`` is
            counted at its reservation (it was surely charged); a failed one at 0.
        """
        with self._changed:
            self._reserved = self._reserved.minus(reservation.spend)
            self._in_flight -= 1
            if usage is not None and (usage[0] is not None or usage[1] is not None):
                input_tokens, output_tokens = usage[0] or 0, usage[1] or 0
                spent = self._spend(reservation.model, input_tokens, output_tokens)
                self._learn(reservation.model, reservation.prompt_estimate, input_tokens,
                            output_tokens)
            else:
                spent = reservation.spend if answered else Spend()
            self.this_run = self.this_run.plus(spent)
            self._changed.notify_all()

    # -- reading it ---------------------------------------------------------------------------

    @property
    def spent(self) -> Spend:
        """What the whole job spent so far: earlier runs and this run's settled requests."""
        with self._changed:
            return self.earlier.plus(self.this_run)

    def describe(self) -> str:
        """``"4,812 of 5,000 tokens"`` (and/or ``"$0.0412 of $0.05"``): the spend against each
        limit, for the message that ends a run."""
        spent = self.spent
        parts = []
        if self.max_total_tokens is not None:
            parts.append(f"{spent.tokens:,} of {self.max_total_tokens:,} tokens")
        if self.max_cost_usd is not None:
            parts.append(f"{format_usd(spent.cost_usd)} of {format_usd(self.max_cost_usd)}")
        return " and ".join(parts)

    # -- arithmetic ---------------------------------------------------------------------------

    def _spend(self, model: Optional[str], input_tokens: int, output_tokens: int) -> Spend:
        cost = 0.0
        if self.max_cost_usd is not None:
            price = self.prices.price_of(model)
            if price is None:  # check_prices() refuses this before anything is sent
                self.check_prices([model])
            assert price is not None
            cost = price.cost_usd(input_tokens, output_tokens)
        return Spend(input_tokens + output_tokens, cost)

    def _fits(self, spend: Spend) -> bool:
        if self.max_total_tokens is not None and spend.tokens > self.max_total_tokens:
            return False
        # a cent's billionth of slack: sums of float prices must not refuse an exact fit
        return self.max_cost_usd is None or spend.cost_usd <= self.max_cost_usd + 1e-12

    def _learn(self, model: Optional[str], prompt_estimate: Optional[int], input_tokens: int,
               output_tokens: int) -> None:
        history = self._history.get(model)
        if history is None:
            history = self._history[model] = _ModelHistory()
        if history.longest_answer is None or output_tokens > history.longest_answer:
            history.longest_answer = output_tokens
        if prompt_estimate:
            history.prompt_estimates += prompt_estimate
            history.input_tokens += input_tokens
