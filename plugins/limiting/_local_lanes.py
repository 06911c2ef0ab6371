"""What the in-process store keeps of each model lane and of each attempt.

A :class:`Lane` holds one model's slots and buckets, what adaptive mode learned for it, and
what its answers taught: the server's tokenizer against the client's estimate, the usual
answer length, a learned token rate, the limits an answer stated, a configured rate's burst
that was too large; it settles an attempt's tokens once the answer says what the server
charged. A :class:`Permit`
is an admitted attempt, a :class:`Waiter` one still queued. The queue and the admission rules
are :class:`.local.AdmissionLimiter`'s.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from cometkit import AttemptResult, RequestInfo
from cometkit.buckets import TokenBucket

from .adaptive import MAX_HOLD_S, AdaptiveControl
from .plan import paced_rate, token_refund

__all__ = ["Lane", "Permit", "Waiter", "rate_bucket"]

logger = logging.getLogger("cometkit.limiter")

#: Weight of the newest observation in a lane's learned server-tokens / estimate ratio.
TOKEN_RATIO_SMOOTHING = 0.3
#: A prompt estimated below this many tokens says too little about the server's tokenizer.
MIN_RATIO_SAMPLE_TOKENS = 16
#: The learned tokenizer ratio stays within these bounds.
TOKEN_RATIO_BOUNDS = (0.2, 5.0)


class Lane:
    """The calls of one model: its slots, its buckets and what adaptive mode learned.

    ``token_ratio`` is the server's token count over the client's estimate, learned from
    ``usage``.
    """

    __slots__ = ("model", "max_concurrency", "in_flight", "waiting", "requests", "tokens",
                 "control", "token_ratio", "count_tokens", "learned_tokens", "answer_tokens",
                 "admitted", "stated_seq")

    def __init__(self, model: Optional[str], max_concurrency: int,
                 requests: Optional[TokenBucket], tokens: Optional[TokenBucket],
                 control: Optional[AdaptiveControl], count_tokens: bool) -> None:
        self.model = model
        self.max_concurrency = max_concurrency
        self.in_flight = 0
        self.waiting = 0
        self.requests = requests
        self.tokens = tokens
        self.control = control
        #: The token rate adaptive mode learned from token refusals, as a bucket.
        self.learned_tokens: Optional[TokenBucket] = None
        #: Smoothed answer length (``usage.completion_tokens``), reserved for calls that set
        #: no ``max_tokens``: the server charges the answer too, and reserving nothing for it
        #: sends twice what the bucket holds.
        self.answer_tokens: Optional[float] = None
        self.token_ratio: Optional[float] = None
        self.count_tokens = count_tokens
        #: Attempts admitted so far, and the number (``Permit.seq``) of the latest-admitted
        #: attempt whose answer stated the requests remaining: what the server knew last.
        self.admitted = 0
        self.stated_seq = 0

    def price(self, estimate: tuple[int, int]) -> tuple[int, int, int]:
        """``(cost, prompt estimate, reserved answer)`` in tokens of an attempt of this lane,
        from the client's ``(prompt, max_tokens)`` estimate, the prompt scaled by what the
        server's tokenizer was seen to count, an answer length reserved when no
        ``max_tokens`` is set."""
        prompt, answer = estimate
        scaled = math.ceil(prompt * self.token_ratio) if self.token_ratio else prompt
        guess = math.ceil(self.answer_tokens) if not answer and self.answer_tokens else 0
        return scaled + answer + guess, prompt, answer

    def allowed(self) -> int:
        if self.control is None:
            return self.max_concurrency
        return min(self.max_concurrency, self.control.allowed())

    def demand_changed(self, now: float) -> None:
        if self.control is not None:
            self.control.note_demand(now, self.in_flight + self.waiting > 0)

    def learn_usage(self, permit: Permit, result: AttemptResult) -> None:
        """Learn the server's tokenizer and the answer length from an answer's ``usage``."""
        if result.input_tokens is not None and permit.prompt_estimate >= MIN_RATIO_SAMPLE_TOKENS:
            self._learn_token_ratio(result.input_tokens / permit.prompt_estimate)
        if result.output_tokens is not None:
            output = float(result.output_tokens)
            self.answer_tokens = output if self.answer_tokens is None else (
                self.answer_tokens + TOKEN_RATIO_SMOOTHING * (output - self.answer_tokens))

    def _learn_token_ratio(self, observed: float) -> None:
        low, high = TOKEN_RATIO_BOUNDS
        observed = min(high, max(low, observed))
        if self.token_ratio is None:
            self.token_ratio = observed
        else:
            self.token_ratio += TOKEN_RATIO_SMOOTHING * (observed - self.token_ratio)

    def follow_token_rate(self, rate: float, burst: float, now: float) -> None:
        """Keep the learned token bucket at the rate adaptive mode learned (it holds
        ``burst`` seconds' worth, at least one call's worth of a few thousand tokens)."""
        bucket = self.learned_tokens
        capacity = max(1.0, burst * rate)
        if bucket is None:
            self.learned_tokens = TokenBucket(rate, capacity, now)
            return
        bucket.ready_at(0, now)  # refill at the old rate up to now
        bucket.rate_per_s = rate
        bucket.capacity = capacity
        bucket.level = min(bucket.level, capacity)

    def learn_stated_limits(self, permit: Permit, accepted: bool, hints: Any, now: float,
                            safety_margin: float) -> None:
        """An answer saying that no request (or token) remains holds it until the
        server's reset -- or, for a per-minute limit, until one more is due (``60 / limit``
        seconds), whichever comes first -- instead of spending a 429 to learn it. Requests
        admitted after the answered one count against what it said remained: with 11 in
        flight and 5 remaining, the lane stops now, not after six 429s. Without a reset, an
        accepted answer saying none remain holds as a hint-less 429 would. A stated token
        limit becomes the lane's token rate; a stated request limit is not used as a pace
        (gateways state a window's quota in the same headers)."""
        control = self.control
        if control is None:
            return
        requests_left = hints.remaining_requests
        if requests_left is not None:
            if permit.seq < self.stated_seq:
                requests_left = None  # older news than an answer already read
            else:
                self.stated_seq = permit.seq
                requests_left -= self.admitted - permit.seq
        for remaining, limit, reset, of_requests in (
                (requests_left, hints.limit_requests, hints.reset_requests_s, True),
                (hints.remaining_tokens, hints.limit_tokens, hints.reset_tokens_s, False)):
            if remaining is None or remaining > 0:
                continue
            if reset is not None:
                wait = min(reset, 60.0 / limit) if limit else reset
                control.hold_until = max(control.hold_until, now + min(wait, MAX_HOLD_S))
            elif of_requests and accepted:
                control.stated_exhausted(now)
        if hints.limit_tokens:
            # A stated token limit is per minute in every header family (unlike requests,
            # which gateways state per window): spend tokens at it before a 429 says so.
            self.count_tokens = True
            control.adopt_token_rate(hints.limit_tokens / 60.0 * (1.0 - safety_margin))

    def refused_at_configured_rate(self, client_requests: Optional[TokenBucket]) -> None:
        """A configured rate was refused: first shrink its burst (one second's worth is more
        than some servers hold); only when it refuses at the smallest burst may adaptive mode
        send below the configured rate. ``client_requests``: the client-wide request bucket."""
        shrunk = False
        for bucket in (client_requests, self.requests):
            if bucket is not None and bucket.capacity > 1.0:
                bucket.capacity = max(1.0, bucket.capacity / 2.0)
                bucket.level = min(bucket.level, bucket.capacity)
                shrunk = True
        if shrunk:
            logger.info("429 at the configured rate for model=%s: burst halved",
                        self.model or "-")
        elif self.control is not None:
            self.control.refused_at_floor()

    def settle_tokens(self, permit: Permit, result: AttemptResult, now: float,
                      client_tokens: Optional[TokenBucket]) -> None:
        """Replace the estimate with what the server charged: the prompt it counted plus the
        larger of the reserved ``max_tokens`` and the answer (providers reserve
        ``max_tokens``); refund a refused call, to ``client_tokens`` (the client-wide token
        bucket) and the lane's. Learn the server's tokenizer from ``usage``."""
        refund = token_refund(permit.cost, result, permit.answer_reserved)
        if refund is None:
            return
        self.learn_usage(permit, result)
        for bucket in (client_tokens, self.tokens, self.learned_tokens):
            if bucket is not None:
                bucket.give(refund, now)


class Permit:
    """Handed out by :meth:`.local.AdmissionLimiter.acquire`; given back once to ``release``."""

    __slots__ = ("lane", "cost", "prompt_estimate", "answer_reserved", "probe", "level", "seq",
                 "window_rank", "released")

    def __init__(self, lane: Lane, cost: int, prompt_estimate: int = 0,
                 answer_reserved: int = 0, probe: bool = False, level: int = 1,
                 seq: int = 0) -> None:
        self.lane = lane
        self.cost = cost
        #: Its place among the lane's admissions (1 for the first).
        self.seq = seq
        #: The lane's attempts in flight when this one was admitted, itself included.
        self.level = level
        #: Its place among the admissions of a known window, counted over the whole fleet by
        #: a store that shares one (0: not counted).
        self.window_rank = 0
        self.prompt_estimate = prompt_estimate
        self.answer_reserved = answer_reserved
        #: The probe of a half-open lane: its answer decides whether the lane reopens.
        self.probe = probe
        self.released = False

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<limiter permit model={self.lane.model or '-'} tokens={self.cost} {state}>"


#: The price of an attempt while its lane does not count tokens.
_FREE = (0, 0, 0)


class Waiter:
    """An attempt queued for admission, priced at what its lane knows."""

    __slots__ = ("lane", "request", "cost", "parts", "estimate", "cond", "permit", "since",
                 "rank")

    def __init__(self, lane: Lane, request: RequestInfo) -> None:
        self.lane = lane
        self.request = request
        #: Its priority lane's rank (0: the highest): the queue's first order.
        self.rank = request.priority_rank
        self.cost = 0
        self.parts = _FREE
        #: The client's ``(prompt, max_tokens)`` estimate, made once, when tokens count.
        self.estimate: Optional[tuple[int, int]] = None
        #: Set when it queues (an attempt admitted at once never waits on it).
        self.cond: Any = None
        self.permit: Optional[Permit] = None
        #: When the call began: a call back from a 429 keeps its place among the oldest of
        #: its priority lane.
        self.since = request.started_at
        self.reprice()

    def reprice(self) -> None:
        """Price the attempt at what its lane knows now: a call that queued before the
        lane counted tokens (or learned the server's ratio) must not go out uncharged."""
        if not self.lane.count_tokens:
            return
        if self.estimate is None:
            self.estimate = self.request.token_estimate
        self.parts = self.lane.price(self.estimate)
        self.cost = self.parts[0]


def rate_bucket(per_minute: Optional[float], burst: float, margin: float,
                now: float) -> Optional[TokenBucket]:
    """The token bucket of a configured per-minute rate (:func:`.plan.paced_rate`);
    ``None`` for no limit."""
    paced = paced_rate(per_minute, burst, margin)
    return None if paced is None else TokenBucket(*paced, now)
