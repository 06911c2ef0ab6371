"""``backoff``: the first-party retry strategy.

It retries what waiting can fix and nothing else, waits as long as the server asks (or, with
no usable hint, exponentially longer with jitter), and keeps a client-wide *retry budget* so
that a server answering 429 to everything sees a bounded number of extra attempts instead of
``max_attempts`` times the traffic. The options and the log line are documented in
``docs/plugins/backoff.md``.

The policy only decides; the core sleeps the decided delay (outside any limiter slot) and
raises the error when the answer is "no". The budget is a counter of its own
(:mod:`._retry_budget`), re-exported here.

Why this module is over 400 lines: it is the plugin (its options and hooks) and its one
policy, whose :meth:`BackoffPolicy.decide` is a single ordered list of rules over one
answer; its parts (what is retryable, the delay, the deadline, the budget check, the error it
gives up with) are steps of that one decision, not jobs of their own.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Iterable, Mapping, Optional, Union

from cometkit import (
    APIConnectionError,
    APIStatusError,
    AttemptResult,
    ClientContext,
    Clock,
    ConfigError,
    Option,
    PluginSpec,
    RateLimitError,
    RequestInfo,
    RetryDecision,
    SystemClock,
    hookimpl,
)
from cometkit.hints import QUOTA_CODES, WAIT_WORDS, RefusalRules, refusal_text, retry_after_s

from ._retry_budget import RetryBudget

__all__ = [
    "BackoffPolicy",
    "RetryBudget",
    "OPTIONS",
    "cometkit_plugin_spec",
    "cometkit_make_retry_policy",
]

logger = logging.getLogger("cometkit.backoff")

PLUGIN_NAME = "backoff"

#: Statuses and connection-error stages that may be listed in ``retry_on``.
RETRYABLE_STATUSES = (408, 429, 500, 502, 503, 504, 524)
ERROR_STAGES = ("connect", "read")

#: Statuses that mean the request itself is wrong: never retried, whatever ``retry_on`` says.
NEVER_RETRIED_STATUSES = frozenset({400, 401, 403, 404, 413, 422})

#: Provider error codes (``error.code`` or ``error.type`` of the body) on which waiting cannot
#: help: the quota or balance is spent, or the request is larger than any limit allows.
#: A 429 carrying one of these fails at once (the default of ``give_up_codes``).
HOPELESS_ERROR_CODES = QUOTA_CODES
#: Words of a 429 message that mean "try later" even under a quota code (the default of
#: ``wait_despite``; matched case-insensitively).
WAIT_DESPITE_CODE = WAIT_WORDS

#: Jitter added on top of a server hint: uniform in [0, this share of the hint], so clients
#: told the same value do not all wake together.
HINT_JITTER_RATIO = 0.1

#: ``jitter`` values (see the AWS Architecture Blog, "Exponential Backoff and Jitter").
JITTER_MODES = ("additive", "full", "decorrelated", "none")

#: 2 ** this already exceeds any sane ``max_delay / base_delay``; larger exponents overflow.
_MAX_EXPONENT = 62


def _parse_retry_on_item(value: Any) -> Union[int, str]:
    """One ``retry_on`` entry: a retryable status code or ``connect`` / ``read``."""
    allowed = ", ".join(str(s) for s in RETRYABLE_STATUSES) + ", " + ", ".join(
        repr(s) for s in ERROR_STAGES)
    item: Any = value
    if isinstance(item, str):
        item = item.strip().lower()
        if item.isdigit():
            item = int(item)
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise ValueError(f"must be one of {allowed}, got {value!r}")
    if item in NEVER_RETRIED_STATUSES:
        raise ValueError(
            f"{item} is never retried: the request itself is wrong and sending it again cannot "
            f"fix it. Allowed: {allowed}")
    if item not in RETRYABLE_STATUSES and item not in ERROR_STAGES:
        raise ValueError(f"must be one of {allowed}, got {value!r}")
    return item


# -------------------------------------------------------------------------------------------
# The policy
# -------------------------------------------------------------------------------------------


def _explained(result: AttemptResult, explanation: str,
               hint_s: Optional[float] = None) -> Optional[BaseException]:
    """The attempt's error again, of the same class, with why the policy gave up in front.

    A ``RateLimitError`` stays a ``RateLimitError`` (a 503 stays an ``InternalServerError``),
    so callers catch what they would have caught; the status, request id, body and code are
    kept. ``None`` for errors this cannot rebuild: the core then raises the original.
    """
    error = result.error
    try:
        if isinstance(error, APIStatusError):
            return type(error)(
                f"{explanation}; last error: {error}", status_code=error.status_code,
                request_id=error.request_id, body=error.body, code=error.code,
                response=error.response, response_body=error.response_body,
                retry_after_s=hint_s if hint_s is not None else error.retry_after_s)
        if isinstance(error, APIConnectionError):
            return type(error)(f"{explanation}; last error: {error}",
                               request_id=error.request_id, stage=error.stage)
        if error is None and result.status_code == 429:
            return RateLimitError(explanation, status_code=429, retry_after_s=hint_s)
    except TypeError:  # a subclass with another constructor: keep the original
        return None
    return None


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


class BackoffPolicy:
    """Decides whether a failed attempt is tried again, and after how long.

    Rules, in order: only what ``retry_on`` lists is retried (never 400, 401, 403, 404, 413,
    422, nor a 429 whose code says the quota is spent or the request is too large); at most
    ``max_attempts`` attempts; the server's hint (``retry-after-ms``, ``Retry-After``,
    ``x-ratelimit-reset-*``) plus up to 10 % jitter, else ``base_delay * 2 ** (attempt - 1)``
    (``failure_base_delay`` for a failure other than a 429) capped at ``max_delay`` with
    ``jitter``; a hint over ``max_retry_after`` fails at once; a
    wait that would end past ``deadline`` fails at once; and the client-wide
    :class:`RetryBudget` must allow the retry. The deadline is the call's own
    (:attr:`cometkit.RequestInfo.deadline_s`); ``deadline`` here is deprecated and only
    serves calls that have none (the configuration's ``backoff.deadline`` becomes the
    client's deadline instead).

    A 429 that the limiter reads as "the server still accepts calls at its limit" (its
    :class:`cometkit.Throttle` says ``accepting``) is different: the call waits its turn in the
    limiter's queue (a *requeue*), which counts neither against ``max_attempts`` nor against the
    budget, because the attempts are spent per limit (the limiter sends few probes while the
    limit is closed), not per call. Only ``max_retry_after`` and ``deadline`` end such a call.

    One policy serves every thread of a client: the budget is guarded by a lock; per-call state
    (attempts spent, the previous delay for decorrelated jitter) is read from the call's own
    history (:attr:`cometkit.AttemptResult.history`), never kept here.
    """

    #: Defaults (also those of :data:`OPTIONS`, hence of the configuration).
    DEFAULT_RETRY_ON = (429,)
    DEFAULT_MAX_ATTEMPTS = 5
    DEFAULT_BASE_DELAY = 1.0
    #: A temporary failure (5xx, a broken connection) is retried sooner than a 429, as the
    #: openai SDK does: nothing says the server is saving up capacity.
    DEFAULT_FAILURE_BASE_DELAY = 0.5
    DEFAULT_MAX_DELAY = 30.0
    DEFAULT_JITTER = "additive"
    DEFAULT_MAX_RETRY_AFTER = 120.0
    DEFAULT_BUDGET_RATIO = 0.2
    DEFAULT_BUDGET_FLOOR = 5
    DEFAULT_BUDGET_WINDOW = 10.0

    def __init__(
        self,
        *,
        retry_on: Iterable[Union[int, str]] = DEFAULT_RETRY_ON,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        failure_base_delay: float = DEFAULT_FAILURE_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        jitter: str = DEFAULT_JITTER,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        deadline: Optional[float] = None,
        budget_ratio: float = DEFAULT_BUDGET_RATIO,
        budget_floor: int = DEFAULT_BUDGET_FLOOR,
        budget_window: float = DEFAULT_BUDGET_WINDOW,
        give_up_codes: Iterable[str] = tuple(sorted(HOPELESS_ERROR_CODES)),
        wait_despite: Iterable[str] = WAIT_DESPITE_CODE,
        clock: Optional[Clock] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        try:
            self.retry_on = frozenset(_parse_retry_on_item(item) for item in retry_on)
        except ValueError as exc:
            raise ConfigError(f"{PLUGIN_NAME}.retry_on: {exc}", key="retry_on") from exc
        if jitter not in JITTER_MODES:
            raise ConfigError(f"{PLUGIN_NAME}.jitter: must be one of {JITTER_MODES}, "
                              f"got {jitter!r}", key="jitter")
        if max_attempts < 1:
            raise ConfigError(f"{PLUGIN_NAME}.max_attempts: must be >= 1, got {max_attempts!r}",
                              key="max_attempts")
        self.max_attempts = int(max_attempts)
        self.base_delay = float(base_delay)
        self.failure_base_delay = float(failure_base_delay)
        self.max_delay = float(max_delay)
        self.jitter = jitter
        self.max_retry_after = float(max_retry_after)
        self.deadline = None if deadline is None else float(deadline)
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.budget = RetryBudget(budget_ratio, budget_floor, budget_window, self.clock)
        #: Which 429s are hopeless: the core reads this too, so the limiter never holds its
        #: lane for a 429 this policy gives up on (nor ignores one it waits for).
        self.refusal_rules = RefusalRules.of(give_up_codes, wait_despite)
        # Only decides whether to log a warning: an unguarded race costs at most a second line.
        self._budget_exhausted = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, clock: Optional[Clock] = None,
                     rng: Optional[random.Random] = None) -> BackoffPolicy:
        """Build from a validated ``plugins.backoff`` section (absent keys take defaults).
        Its deprecated ``deadline`` is left out: the client makes it the call deadline."""
        return cls(**{k: v for k, v in options.items() if k in OPTIONS and k != "deadline"},
                   clock=clock, rng=rng)

    def __repr__(self) -> str:
        retry_on = sorted(self.retry_on, key=str)
        return (f"BackoffPolicy(retry_on={retry_on!r}, max_attempts={self.max_attempts!r}, "
                f"base_delay={self.base_delay!r}, max_delay={self.max_delay!r}, "
                f"jitter={self.jitter!r}, max_retry_after={self.max_retry_after!r}, "
                f"deadline={self.deadline!r}, budget={self.budget!r})")

    # -- RetryPolicy protocol ---------------------------------------------------------------

    def on_call_start(self, request: RequestInfo) -> None:
        """Every call earns the budget its share of a retry."""
        self.budget.deposit()

    def decide(self, result: AttemptResult) -> RetryDecision:
        """Answer for one failed attempt (see the class docstring for the rules)."""
        retryable, reason = self._classify(result)
        if not retryable:
            return self._final(result, RetryDecision(False, reason=reason))
        if result.hints is not None:
            hint = result.hints.wait_s
        else:
            hint = retry_after_s(result.headers, self.clock.time()) if result.headers else None
        throttle = result.throttle
        if throttle is not None and throttle.accepting and result.status_code == 429:
            return self._requeue(result, hint, throttle.wait_s)
        # Attempts this call spent itself; those a limit made it repeat (requeues) are free.
        spent = result.attempt - sum(1 for decision in result.history if decision.requeue)
        max_attempts = result.request.max_attempts or self.max_attempts
        if spent >= max_attempts:
            limit = (f"max_retries={max_attempts - 1}" if result.request.max_attempts
                     else f"max_attempts={max_attempts}")
            return self._final(result, RetryDecision(
                False, reason="max_attempts reached",
                error=_explained(result, f"gave up after {result.attempt} attempts ({limit})")))

        too_long = self._hint_too_long(result, hint)
        if too_long is not None:
            return too_long
        delay = self._delay(result, hint)
        past = self._past_deadline(result, delay)
        if past is not None:
            return past

        if not self.budget.try_withdraw():
            return self._final(result, self._budget_refusal(result))
        self._budget_exhausted = False

        request = result.request
        logger.info("retry %d/%d of %s %s model=%s after %s in %s s",
                    spent + 1, max_attempts, request.method, request.route,
                    request.model or "-", reason, _seconds(delay),
                    extra={"request_id": request.request_id})
        return RetryDecision(True, delay, reason)

    def _requeue(self, result: AttemptResult, hint: Optional[float],
                 expected_wait_s: Optional[float]) -> RetryDecision:
        """A 429 while the server keeps accepting: wait in the limiter, spend no attempt."""
        too_long = self._hint_too_long(result, hint)
        if too_long is not None:
            return too_long
        wait_s = expected_wait_s or 0.0
        past = self._past_deadline(result, wait_s)
        if past is not None:
            return past
        request = result.request
        logger.debug("429 for %s %s model=%s while the server accepts others: waits its turn "
                     "in the limiter (attempt %d)", request.method, request.route,
                     request.model or "-", result.attempt,
                     extra={"request_id": request.request_id})
        return RetryDecision(True, wait_s, "429: waits its turn in the limiter", requeue=True)

    def _hint_too_long(self, result: AttemptResult,
                       hint: Optional[float]) -> Optional[RetryDecision]:
        """The final decision when the server asks for a wait over ``max_retry_after``."""
        if hint is None or hint <= self.max_retry_after:
            return None
        return self._final(result, RetryDecision(
            False, reason="hint over max_retry_after",
            error=_explained(
                result, f"the server asked to wait {_seconds(hint)} s, over "
                        f"max_retry_after={self.max_retry_after:g} s", hint)))

    def _past_deadline(self, result: AttemptResult, delay: float) -> Optional[RetryDecision]:
        """The final decision when waiting ``delay`` more would pass the call's deadline
        (:attr:`cometkit.RequestInfo.deadline_s`, or the deprecated ``deadline`` given to
        this policy for calls without one). Decided here, before the retry budget is touched;
        the core raises its deadline error, which says where the time went."""
        request = result.request
        deadline_s = request.deadline_s if request.deadline_s is not None else self.deadline
        if deadline_s is None:
            return None
        left = request.started_at + deadline_s - self.clock.monotonic()
        if delay < left:
            return None
        return self._final(result, RetryDecision(
            False, delay, reason="deadline", past_deadline=True,
            error=_explained(
                result, f"waiting {_seconds(delay)} s more would pass the deadline "
                        f"of {deadline_s:g} s ({_seconds(deadline_s - left)} s spent in "
                        f"{result.attempt} attempts)")))

    # -- the rules ---------------------------------------------------------------------------

    def _classify(self, result: AttemptResult) -> tuple[bool, str]:
        """Whether ``retry_on`` covers this failure, and its name (``429``, ``read error``)."""
        stage = result.error_stage
        if stage is not None:
            return stage in self.retry_on, f"{stage} error"
        status = result.status_code
        if status is None:
            return False, type(result.error).__name__
        if status not in self.retry_on:  # never one of NEVER_RETRIED_STATUSES
            return False, f"{status} is not retried"
        if status == 429:
            code = self.refusal_rules.quota_reason(refusal_text(result.error))
            if code is not None:
                return False, f"429 with {code!r}: waiting cannot fix it"
        return True, str(status)

    def _delay(self, result: AttemptResult, hint: Optional[float]) -> float:
        # A 429 starts at base_delay (CometAPI's guide), any other failure at
        # failure_base_delay; additive jitter adds up to a second, or up to the base if less.
        base = self.base_delay if result.status_code == 429 else self.failure_base_delay
        if hint is not None:
            delay = hint + self.rng.uniform(0.0, HINT_JITTER_RATIO * hint)
        elif self.jitter == "decorrelated":
            previous = next((d.delay_s for d in reversed(result.history) if not d.requeue),
                            base)
            delay = min(self.max_delay, self.rng.uniform(base, previous * 3))
        else:
            exponent = min(result.attempt - 1, _MAX_EXPONENT)
            capped = min(self.max_delay, base * 2.0 ** exponent)
            if self.jitter == "additive":
                delay = capped + self.rng.uniform(0.0, min(1.0, base))
            elif self.jitter == "full":
                delay = self.rng.uniform(0.0, capped)
            else:
                delay = capped
        return delay

    def _budget_refusal(self, result: AttemptResult) -> RetryDecision:
        calls, retries = self.budget.counts()
        budget = self.budget
        explanation = (
            f"retry budget exhausted: {retries} retries for {calls} calls in the last "
            f"{budget.window_s:g} s (budget_ratio={budget.ratio:g}, "
            f"budget_floor={budget.floor}); failing fast instead of adding to a retry storm")
        if not self._budget_exhausted:
            self._budget_exhausted = True
            logger.warning("%s", explanation)
        return RetryDecision(False, reason="retry budget exhausted",
                             error=_explained(result, explanation))

    def _final(self, result: AttemptResult, decision: RetryDecision) -> RetryDecision:
        """The call ends here (logged at debug level)."""
        logger.debug("not retrying %s %s (%s) after attempt %d: %s",
                     result.request.method, result.request.route, result.request.request_id,
                     result.attempt, decision.reason)
        return decision


# -------------------------------------------------------------------------------------------
# Options
# -------------------------------------------------------------------------------------------


#: The ``plugins.backoff`` section; the reference in docs/plugins/backoff.md follows it.
OPTIONS: Mapping[str, Option] = {
    "retry_on": Option(
        "list", default=list(BackoffPolicy.DEFAULT_RETRY_ON),
        item=Option("any", choices=RETRYABLE_STATUSES + ERROR_STAGES, parse=_parse_retry_on_item),
        help="Failures to retry: status codes, 'connect' (never reached the server) and "
             "'read' (broke after sending: may be billed twice).",
        example=[429, 503, "connect"]),
    "max_attempts": Option(
        "int", default=BackoffPolicy.DEFAULT_MAX_ATTEMPTS, minimum=1,
        help="Attempts per call, the first one included (1: never retry)."),
    "base_delay": Option(
        "float", default=BackoffPolicy.DEFAULT_BASE_DELAY, minimum=0,
        help="Seconds before the first retry when the server gives no hint; doubles each time."),
    "failure_base_delay": Option(
        "float", default=BackoffPolicy.DEFAULT_FAILURE_BASE_DELAY, minimum=0,
        help="Seconds before the first retry of an opted-in temporary failure (5xx, connect, "
             "read) without a hint; doubles each time. A 429 waits base_delay."),
    "max_delay": Option(
        "float", default=BackoffPolicy.DEFAULT_MAX_DELAY, minimum=0,
        help="Largest computed delay in seconds, before jitter."),
    "jitter": Option(
        "str", default=BackoffPolicy.DEFAULT_JITTER, choices=JITTER_MODES,
        help="'additive' adds 0-1 s, 'full' waits uniform 0..delay, 'decorrelated' follows "
             "AWS's decorrelated jitter, 'none' waits exactly the delay."),
    "max_retry_after": Option(
        "float", default=BackoffPolicy.DEFAULT_MAX_RETRY_AFTER, minimum=0,
        help="A server hint longer than this (seconds) fails the call at once instead of "
             "sleeping."),
    "deadline": Option(
        "float", default=None, minimum=0, nullable=True,
        help="Deprecated: the top-level deadline (it becomes that, with a warning); seconds "
             "one call may take across admission, attempts and waits.",
        example=60),
    "budget_ratio": Option(
        "float", default=BackoffPolicy.DEFAULT_BUDGET_RATIO, minimum=0,
        help="Retries may add at most this share of the client's recent calls."),
    "budget_floor": Option(
        "int", default=BackoffPolicy.DEFAULT_BUDGET_FLOOR, minimum=0,
        help="Retries allowed in any window on top of budget_ratio, so a quiet client can "
             "still retry."),
    "budget_window": Option(
        "float", default=BackoffPolicy.DEFAULT_BUDGET_WINDOW, minimum=0.001,
        help="Seconds of 'recent' for the retry budget."),
    "give_up_codes": Option(
        "list", default=sorted(HOPELESS_ERROR_CODES), item=Option("str"),
        help="Error codes or types of a 429 body that mean waiting cannot help (quota or "
             "balance spent): the call fails at once.", example=["insufficient_quota"]),
    "wait_despite": Option(
        "list", default=list(WAIT_DESPITE_CODE), item=Option("str"),
        help="Words of a 429 message that mean 'try later' even under one of give_up_codes "
             "(gateways that word an upstream overload as a quota error); case-insensitive.",
        example=["saturated", "try again later"]),
}



# -------------------------------------------------------------------------------------------
# Hooks
# -------------------------------------------------------------------------------------------


@hookimpl
def cometkit_plugin_spec() -> PluginSpec:
    return PluginSpec(
        options=OPTIONS,
        enabled_by_default=True,
        summary="Retries 429s (and opted-in temporary failures) with server hints, "
                "exponential backoff, jitter and a client-wide retry budget.",
    )


@hookimpl(trylast=True)
def cometkit_make_retry_policy(ctx: ClientContext) -> BackoffPolicy:
    return BackoffPolicy.from_options(ctx.options(), clock=ctx.clock, rng=ctx.random)
