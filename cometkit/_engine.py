"""The life of one call: admit, send, report, decide, sleep, record.

This is the one place that sequences the plugins' objects. ``Client`` uses it with its own
transport; ``CometAdapter`` uses it to wrap a legacy ``requests`` Session. Both hand it an
``attempt`` function that sends once and fills in an :class:`AttemptResult`. How calls are
named is :mod:`cometkit._call_names`; the endings that finalizers hand over wait in
:mod:`cometkit._deferred`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

from ._deferred import Deferred
from ._exceptions import APIConnectionError, APITimeoutError
from ._workers import sleep_aside
from .clock import Clock
from .hints import DEFAULT_REFUSALS, RefusalRules, parse_hints, refusal_text
from .plugin_api import (
    AttemptRecord,
    AttemptResult,
    CallRecord,
    CallTiming,
    Limiter,
    MetricsSink,
    RequestInfo,
    RetryDecision,
    RetryPolicy,
    Throttle,
    short_seconds,
)

__all__ = ["CallEngine", "Sent", "cut_timeout", "usage_tokens"]

logger = logging.getLogger("cometkit")


def usage_tokens(usage: Any) -> tuple[Optional[int], Optional[int]]:
    """``(input, output)`` tokens from an OpenAI-style ``usage`` block."""
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return prompt, completion


@dataclass
class Sent:
    """What one attempt produced, besides the facts in its AttemptResult."""

    value: Any = None
    response: Any = None
    provider_request_id: Optional[str] = None
    response_model: Optional[str] = None
    #: A success whose body is still being read (a stream): the limiter slot stays held and
    #: the attempt is finished later through :meth:`CallEngine.end_of_stream`.
    streaming: bool = False
    #: A held stream's events, its first one already read within the attempt.
    events: Any = None


class Ended(NamedTuple):
    """How :meth:`CallEngine.execute` ended a call."""

    #: What the last attempt produced (its response, decoded value, provider request id).
    sent: Sent
    #: The last attempt's result.
    result: AttemptResult
    #: The exception the call ends with; ``None`` on success.
    error: Optional[BaseException]
    #: The limiter's permit, still held only when ``sent.streaming`` (a stream being read).
    permit: Any


#: Sends one attempt: fills ``result`` (status, headers, error, usage) and returns what it got.
AttemptFn = Callable[[AttemptResult], Sent]


def cut_timeout(timeout_s: tuple[float, float], time_left_s: Optional[float]
                ) -> tuple[float, float]:
    """``(connect, read)`` timeouts no longer than what is left of the call's deadline, so an
    attempt against a server that never answers ends when the deadline does."""
    if time_left_s is None:
        return timeout_s
    left = max(time_left_s, 0.001)  # urllib3 refuses 0; the deadline check follows at once
    return min(timeout_s[0], left), min(timeout_s[1], left)


class CallEngine:
    """Runs calls through a client's retry policy, limiter and sinks. Thread-safe."""

    def __init__(self, *, clock: Clock, policy: Optional[RetryPolicy],
                 limiter: Optional[Limiter], sinks: list[MetricsSink],
                 server_address: str) -> None:
        self.clock = clock
        self.policy = policy
        rules = getattr(policy, "refusal_rules", None)
        #: Which 429s are a spent quota: the retry policy's lists, so policy and limiter agree.
        self._refusals = rules if isinstance(rules, RefusalRules) else DEFAULT_REFUSALS
        self.limiter = limiter
        self.sinks = sinks
        self.server_address = server_address
        self._failed_sinks: set[int] = set()
        self._lock = threading.Lock()
        self.stats = {"calls": 0, "attempts": 0, "retries": 0, "failures": 0, "sink_errors": 0}
        #: Endings of abandoned streams, handed over by finalizers (:mod:`cometkit._deferred`).
        self._deferred = Deferred()
        #: Run ``fn(*args)`` soon on a normal thread; safe from a finalizer (any lock held).
        self.defer = self._deferred.put
        #: Run what finalizers handed over, now.
        self.drain_deferred = self._deferred.drain
        self._nothing_deferred = self._deferred.queue.empty

    # -- bookkeeping ------------------------------------------------------------------------

    def count(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                self.stats[key] += delta

    def sink_call(self, sink: Any, method: str, *args: Any) -> None:
        """Call a sink; a failure is logged once per sink, then only counted."""
        try:
            getattr(sink, method)(*args)
        except Exception:
            self.count(sink_errors=1)
            if id(sink) not in self._failed_sinks:
                self._failed_sinks.add(id(sink))
                logger.warning("metrics sink %r failed in %s(); the call goes on, further "
                               "failures of this sink are only counted", sink, method,
                               exc_info=True)

    def _emit_attempt(self, result: AttemptResult, sent: Sent, outcome: str,
                      retry_delay_s: Optional[float], ttfc_s: Optional[float] = None) -> None:
        request = result.request
        record = AttemptRecord(
            timestamp=self.clock.time(), request_id=request.request_id,
            attempt=result.attempt, operation=request.operation, method=request.method,
            route=request.route, server_address=self.server_address, model=request.model,
            response_model=sent.response_model, status_code=result.status_code,
            error_type=type(result.error).__name__ if result.error is not None else None,
            outcome=outcome, duration_s=result.duration_s, ttfc_s=ttfc_s,
            retry_delay_s=retry_delay_s, input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            provider_request_id=sent.provider_request_id, queue_s=result.queue_s,
        )
        for sink in self.sinks:
            self.sink_call(sink, "record_attempt", record)

    def _emit_call(self, result: AttemptResult, outcome: str) -> None:
        request, timing = result.request, result.timing
        record = CallRecord(
            timestamp=self.clock.time(), request_id=request.request_id,
            operation=request.operation, method=request.method, route=request.route,
            server_address=self.server_address, model=request.model, attempts=result.attempt,
            status_code=result.status_code,
            error_type=type(result.error).__name__ if result.error is not None else None,
            outcome=outcome, duration_s=self.clock.monotonic() - request.started_at,
            input_tokens=result.input_tokens, output_tokens=result.output_tokens,
            queue_s=timing.queue_s, wire_s=timing.wire_s, backoff_s=timing.backoff_s,
        )
        for sink in self.sinks:
            self.sink_call(sink, "record_call", record)

    # -- the loop ---------------------------------------------------------------------------

    def execute(self, request: RequestInfo, attempt_fn: AttemptFn) -> Ended:
        """Run one call to its end, within ``request.deadline_s`` when it has one.

        :returns: :class:`Ended` (``sent, result, error, permit``, as a tuple too): ``error``
            is the exception the call ends with (``None`` on success); ``permit`` is still
            held only when ``sent.streaming``.
        """
        tally = [0, 0]  # attempts ended (a held stream's ends later), retries
        ended: Optional[Ended] = None
        try:
            ended = self._execute(request, attempt_fn, tally)
            return ended
        finally:  # one lock per call for the counters
            self.count(calls=1, attempts=tally[0], retries=tally[1],
                       failures=1 if ended is not None and ended.error is not None else 0)

    def _execute(self, request: RequestInfo, attempt_fn: AttemptFn, tally: list
                 ) -> Ended:
        clock, policy, limiter = self.clock, self.policy, self.limiter
        if not self._nothing_deferred():
            self.drain_deferred()
        if policy is not None:
            policy.on_call_start(request)
        attempt = 0
        history: tuple[RetryDecision, ...] = ()
        timing = CallTiming()
        last_error: Optional[BaseException] = None
        while True:
            attempt += 1
            permit, queue_s = None, 0.0
            if limiter is not None:
                permit, queue_s, refused = self._admit(request, timing, last_error)
                if refused is not None:
                    return refused
            result = AttemptResult(request, attempt, started_at=clock.monotonic(),
                                   queue_s=queue_s, history=history, timing=timing)
            result.time_left_s = request.time_left_s(result.started_at)
            if result.time_left_s is not None and result.time_left_s <= 0:
                # admitted at the very end: not sent (it could only time out, or be billed)
                result.error_stage = "connect"
                if limiter is not None:
                    limiter.release(permit, result)
                return self._end_at_deadline(request, timing, "it passed while waiting for "
                                             "admission", last_error)
            try:
                sent = attempt_fn(result)
            except BaseException as exc:  # never leak a permit, even on KeyboardInterrupt
                result.error = exc
                self._end_attempt(result)
                if limiter is not None:
                    limiter.release(permit, result)
                raise
            self._end_attempt(result)
            timing.attempts += 1
            if result.headers is not None:
                self._read_hints(result)
            if result.error is None and sent.streaming:
                return Ended(sent, result, None, permit)
            if limiter is not None:
                verdict = limiter.release(permit, result)
                if isinstance(verdict, Throttle):
                    result.throttle = verdict
            tally[0] += 1
            if result.error is None:
                if self.sinks:
                    self._emit_attempt(result, sent, "ok", None)
                    self._emit_call(result, "ok")
                return Ended(sent, result, None, None)

            decision = policy.decide(result) if policy is not None else None
            past = self._past_deadline(result, decision)
            if past is None and decision is not None and decision.retry:
                tally[1] += 1
                history += (decision,)
                last_error = result.error
                # A requeued call waits in the limiter (the next attempt's queue_s), not here.
                sleep_s = decision.delay_s if decision.delay_s > 0 and not (
                    decision.requeue and limiter is not None) else 0.0
                if self.sinks:
                    self._emit_attempt(result, sent, "retry", sleep_s)
                if sleep_s:  # on a pool's worker, another call runs meanwhile
                    sleep_aside(clock.sleep, sleep_s)
                    timing.backoff_s += sleep_s
                continue
            if self.sinks:
                self._emit_attempt(result, sent, "error", None)
            if past is not None:
                return self._end_at_deadline(request, timing, past, result.error, result, sent)
            if self.sinks:
                self._emit_call(result, "error")
            final = result.error
            if decision is not None and decision.error is not None:
                final = decision.error
                if final.__cause__ is None:
                    final.__cause__ = result.error
            return Ended(sent, result, final, None)

    def _end_attempt(self, result: AttemptResult) -> None:
        """Take the attempt's time on the wire so far. A stream's attempt is timed twice, at
        its headers and when its body ends: the call's ``wire_s`` gets only what is new."""
        duration_s = self.clock.monotonic() - result.started_at
        result.timing.wire_s += duration_s - result.duration_s
        result.duration_s = duration_s

    # -- the deadline ---------------------------------------------------------------------------

    def _admit(self, request: RequestInfo, timing: CallTiming,
               last_error: Optional[BaseException]) -> tuple[Any, float, Optional[Ended]]:
        """``(permit, seconds waited, None)``, or ``(None, seconds waited, the call's end)``
        when the deadline passed while waiting: the limiter is given what is left of it."""
        assert self.limiter is not None
        clock = self.clock
        began = clock.monotonic()
        left = request.time_left_s(began)
        waited = 0.0
        try:
            if left is None or left > 0:
                permit = self.limiter.acquire(request, left)
                waited = clock.monotonic() - began
                return permit, waited, None
            cause: Optional[BaseException] = None
        except Exception as exc:
            after = request.time_left_s(clock.monotonic())
            if after is None or after > 0:  # the limiter's own refusal: its error stands
                raise
            cause = exc
        finally:
            waited = waited or clock.monotonic() - began
            timing.queue_s += waited
        return None, waited, self._end_at_deadline(request, timing, "it passed while waiting "
                                                   "for admission", last_error, cause=cause)

    def _past_deadline(self, result: AttemptResult,
                       decision: Optional[RetryDecision]) -> Optional[str]:
        """Why the deadline ends the call after this failed attempt, or ``None`` when it does
        not: a retry whose wait would pass it is not made, whatever the policy decided, and an
        attempt cut short by it (no answer) ends the call at it."""
        left = result.request.time_left_s(self.clock.monotonic())
        if left is None:
            return None
        if decision is not None and (decision.retry or decision.past_deadline):
            wait = decision.delay_s
            if decision.retry and decision.requeue and self.limiter is not None:
                wait = 0.0  # the limiter's queue is given what is left
            if left <= 0:
                return f"it passed during attempt {result.attempt}"
            if decision.past_deadline or wait >= left:
                return (f"the next wait of {short_seconds(wait)} s would pass it "
                        f"({short_seconds(left)} s left)")
            return None
        if left <= 0 and result.status_code is None:
            return f"it passed during attempt {result.attempt}"
        return None  # not retried for the policy's own reasons: its error stands

    def _end_at_deadline(self, request: RequestInfo, timing: CallTiming, why: str,
                         last_error: Optional[BaseException],
                         result: Optional[AttemptResult] = None, sent: Optional[Sent] = None,
                         cause: Optional[BaseException] = None) -> Ended:
        """The call fails with an ``APITimeoutError`` saying where its time went; the call
        record names it (the attempts were recorded as they ended)."""
        text = f"deadline {request.deadline_s:g} s: {timing.describe()}; {why}"
        if last_error is not None:
            text += f"; last error: {last_error}"
        if timing.attempts == 0:
            stage = "connect"  # nothing was sent
        elif isinstance(last_error, APIConnectionError):
            stage = last_error.stage
        else:
            stage = "read"
        error = APITimeoutError(text, request_id=getattr(last_error, "request_id", None),
                                stage=stage, deadline_s=request.deadline_s)
        error.__cause__ = cause if cause is not None else last_error
        if result is None:
            result = AttemptResult(request, timing.attempts, timing=timing)
        result.error = error
        if self.sinks:
            self._emit_call(result, "error")
        return Ended(sent if sent is not None else Sent(), result, error, None)

    def _read_hints(self, result: AttemptResult) -> None:
        """Parse the answer's rate-limit hints once, for the limiter, the policy and the
        exception (whose ``retry_after_s`` is filled here, whoever raises it)."""
        error = result.error
        refused = result.status_code == 429
        hints = result.hints = parse_hints(result.headers, self.clock.time(),
                                           refusal_text(error) if refused else None,
                                           self._refusals)
        if error is not None and getattr(error, "retry_after_s", 0) is None:
            error.retry_after_s = hints.wait_s  # type: ignore[attr-defined]

    def end_of_stream(self, sent: Sent, result: AttemptResult, permit: Any
                 ) -> Callable[[Optional[BaseException], Optional[dict], Optional[str],
                                Optional[float]], None]:
        """The callback that ends a held attempt (a stream) exactly once."""
        if self._deferred.reaper is None:
            self._deferred.start_reaper()

        def finish(error: Optional[BaseException], usage: Optional[dict],
                   response_model: Optional[str], ttfc_s: Optional[float]) -> None:
            self._end_attempt(result)
            if usage is not None:
                result.input_tokens, result.output_tokens = usage_tokens(usage)
            if error is not None:
                result.error = error
            if response_model:
                sent.response_model = response_model
            if self.limiter is not None:
                self.limiter.release(permit, result)
            self.count(attempts=1, failures=1 if error is not None else 0)
            if self.sinks:
                outcome = "ok" if error is None else "error"
                self._emit_attempt(result, sent, outcome, None, ttfc_s)
                self._emit_call(result, outcome)

        return finish

    def close(self) -> None:
        self._deferred.close()
        if self.limiter is not None:
            try:
                self.limiter.close()
            except Exception:
                logger.exception("limiter.close() failed")
        for sink in self.sinks:
            self.sink_call(sink, "flush")
            self.sink_call(sink, "close")
