"""The plugin API: the protocols a plugin implements and the values the hooks pass.

What a plugin is told (:class:`RequestInfo`, :class:`AttemptResult`, the records) and what it
answers (:class:`Throttle`, :class:`RetryDecision`) are the whole vocabulary between the core
and a plugin, with the clock it is given (:mod:`cometkit.clock`). First-party plugins use
nothing else, so a third-party plugin can do everything they do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, runtime_checkable

from .tokens import estimate_parts

if TYPE_CHECKING:  # pragma: no cover
    from .hints import RateLimitHints

__all__ = [
    "RequestInfo",
    "AttemptResult",
    "CallTiming",
    "Throttle",
    "RetryDecision",
    "AttemptRecord",
    "CallRecord",
    "RetryPolicy",
    "Limiter",
    "MetricsSink",
    "ATTEMPT_FIELDS",
    "CALL_FIELDS",
]


@dataclass(frozen=True)
class RequestInfo:
    """One logical call, shared by all of its attempts.

    :ivar request_id: cometkit's own id for the call (``ck-...``); every attempt shares it.
    :ivar operation: OpenTelemetry GenAI operation name: ``chat``, ``embeddings``, ``models``
        or ``request`` for any other route.
    :ivar method: HTTP method, upper case.
    :ivar route: path below the base URL, e.g. ``/chat/completions``.
    :ivar model: the requested model, when the body names one.
    :ivar stream: whether the answer is a server-sent-event stream.
    :ivar json: the request body (read it, never change it; never log it: it holds prompts).
    :ivar started_at: ``clock.monotonic()`` when the call began, for deadlines.
    :ivar deadline_s: seconds the whole call may take from ``started_at`` -- admission waits,
        attempts and retry waits together (``None``: no deadline). The core enforces it; a
        retry policy reads it (:meth:`time_left_s`) to refuse a wait that would pass it.
    :ivar max_attempts: attempts this call may make, set by the openai SDK's
        ``max_retries`` (``Client(max_retries=)``, ``client.with_options(max_retries=)``)
        as ``max_retries + 1``; a retry policy honours it in place of its own limit
        (``None``: the policy's own).
    :ivar priority: the call's priority lane (``priority=``, else the client's ``priority``),
        one of the configured ``priorities``.
    :ivar priority_rank: the lane's place in ``priorities``: 0 for the highest. A limiter
        admits waiting attempts of a lower rank first; it needs no lane names to do so.
    """

    request_id: str
    operation: str
    method: str
    route: str
    model: Optional[str] = None
    stream: bool = False
    json: Optional[Mapping[str, Any]] = None
    started_at: float = 0.0
    deadline_s: Optional[float] = None
    max_attempts: Optional[int] = None
    priority: str = "default"
    priority_rank: int = 1

    @cached_property
    def token_estimate(self) -> tuple[int, int]:
        """``(prompt tokens, reserved answer tokens)`` the body may cost
        (:func:`cometkit.tokens.estimate_parts`): worked out once per call, however many
        attempts and limiters read it."""
        return estimate_parts(self.json)

    def time_left_s(self, now: float) -> Optional[float]:
        """Seconds left of the deadline at ``now`` (``clock.monotonic()``; negative once it
        passed), or ``None`` without a deadline."""
        if self.deadline_s is None:
            return None
        return self.started_at + self.deadline_s - now


@dataclass
class CallTiming:
    """Where one call's time has gone so far, filled in by the core as the call runs.

    One value per call, shared by all of its attempts (:attr:`AttemptResult.timing`), so
    everything that explains a call's time -- its call record, a deadline's error message, a
    retry policy counting what is left -- reads the same sums instead of adding them up
    again. The parts never overlap; whatever a call took beyond their sum is the core's own
    bookkeeping (reading hints, calling sinks), normally microseconds.

    :ivar queue_s: waiting for admission in the limiter, over all attempts. A 429'd call that
        the limiter takes back into its queue (:attr:`RetryDecision.requeue`) waits here, not
        in back-off: the limit holds it, not the retry policy.
    :ivar wire_s: the attempts themselves, from sending to their end (the sum of their
        ``duration_s``; a stream's until it is exhausted or closed).
    :ivar backoff_s: the retry policy's sleeps between attempts.
    :ivar attempts: attempts sent so far.
    """

    queue_s: float = 0.0
    wire_s: float = 0.0
    backoff_s: float = 0.0
    attempts: int = 0

    def describe(self) -> str:
        """``12.1 s waiting for admission, 3 attempts (1.9 s), 6.0 s in back-off``: where a
        call's time went, as a deadline's error says it."""
        plural = "" if self.attempts == 1 else "s"
        return (f"{short_seconds(self.queue_s)} s waiting for admission, {self.attempts} "
                f"attempt{plural} ({short_seconds(self.wire_s)} s), "
                f"{short_seconds(self.backoff_s)} s in back-off")


def short_seconds(value: float) -> str:
    """Seconds for a message: one decimal from a second up, two below."""
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.2f}"


@dataclass
class AttemptResult:
    """What happened to one attempt: handed to the limiter's ``release`` and the retry policy.

    Exactly one of ``status_code`` and ``error`` tells the story: a status code when the server
    answered, an exception when it did not (``error_stage`` then says ``connect`` or ``read``, as
    urllib3 names them). An answer with an error status has ``error`` set to its typed exception
    too.
    """

    request: RequestInfo
    #: 1 for the first attempt.
    attempt: int
    status_code: Optional[int] = None
    #: Response headers (case-insensitive mapping), ``None`` when there was no answer.
    headers: Optional[Mapping[str, str]] = None
    error: Optional[BaseException] = None
    #: ``"connect"`` (never reached the server) or ``"read"`` (broke after sending).
    error_stage: Optional[str] = None
    #: Provider error code from the body, e.g. ``insufficient_quota``.
    error_code: Optional[str] = None
    #: ``clock.monotonic()`` when the attempt was sent and how long it took.
    started_at: float = 0.0
    duration_s: float = 0.0
    #: How long the attempt waited for admission in the limiter before it was sent (0 without
    #: a limiter).
    queue_s: float = 0.0
    #: Token usage reported by the server, when known.
    input_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    #: What the answer's headers (and a 429's wording) say about the server's limits, parsed
    #: once by the core (``None`` when there was no answer).
    hints: Optional[RateLimitHints] = None
    #: The limiter's reading of this attempt, when it gave one (see :class:`Throttle`): set by
    #: the core from ``limiter.release()``'s return value, before the retry policy decides.
    throttle: Optional[Throttle] = None
    #: The retry policy's decisions for the earlier attempts of this call, oldest first: the
    #: call's retry history, as urllib3's ``Retry.history`` (per call, never shared).
    history: tuple = ()
    #: The call's time so far, shared by its attempts (per call, never shared between calls).
    timing: CallTiming = field(default_factory=CallTiming)
    #: Seconds left of the call's deadline when this attempt was sent (``None``: no
    #: deadline): whoever sends the attempt cuts its connect and read timeouts to it.
    time_left_s: Optional[float] = None

    #: The status from which the front that sent this attempt counts an answer as failed:
    #: 400, or 300 for one that follows no redirect (set once, by the attempt function).
    failure_from: int = 400

    @property
    def accepted(self) -> bool:
        """The server answered with a status this attempt's front does not count as a failure
        (the limiter grows on it; a 429 or a 5xx is not, nor is a 3xx to a front that follows
        no redirect). Whether the call then succeeded is ``error is None``: a stream can still
        break, a body fail to decode."""
        return self.status_code is not None and self.status_code < self.failure_from


@dataclass(frozen=True)
class Throttle:
    """A limiter's reading of a refused attempt, returned by ``Limiter.release()``.

    A 429 from a server that keeps accepting calls at its limit means "not now", not "no": the
    call should wait its turn in the limiter (which holds admissions until the limit opens and
    sends only a probe or two meanwhile) instead of spending its attempts. The retry policy
    reads this to tell that case from a storm.

    :ivar accepting: the server accepted calls recently (within the limiter's storm horizon):
        the refused call can wait in the limiter's queue.
    :ivar kind: the limit that refused, as the limiter understood it: ``rate``, ``window``,
        ``tokens`` or ``concurrency``.
    :ivar wait_s: when the limiter expects to admit this model again, in seconds from now
        (``None``: it cannot tell, e.g. it waits for a probe or for calls to finish).
    """

    accepting: bool
    kind: str = "rate"
    wait_s: Optional[float] = None


@dataclass(frozen=True)
class RetryDecision:
    """A retry policy's answer.

    :ivar retry: try again after ``delay_s``.
    :ivar delay_s: seconds to wait before the next attempt (the core sleeps, outside any
        limiter slot).
    :ivar reason: short text for logs, e.g. ``"429"`` or ``"connect error"``.
    :ivar error: when not retrying, an exception to raise instead of the attempt's own (for
        example a ``RateLimitError`` explaining that the retry budget ran out).
    :ivar requeue: retry by waiting in the limiter's queue (no sleep: the limiter holds the
        call until its limit opens). Such a retry is the limit's doing, not the call's: it is
        not counted against the call's attempts.
    :ivar past_deadline: not retrying because the wait (``delay_s``) would end past the call's
        deadline (:attr:`RequestInfo.deadline_s`): the core then fails the call with its
        deadline error, which says where the time went, instead of ``error``.
    """

    retry: bool
    delay_s: float = 0.0
    reason: str = ""
    error: Optional[BaseException] = None
    requeue: bool = False
    past_deadline: bool = False


#: CSV column order of an attempt record; documented in docs/metrics.md.
ATTEMPT_FIELDS = (
    "timestamp",
    "request_id",
    "attempt",
    "operation",
    "method",
    "route",
    "server_address",
    "model",
    "response_model",
    "status_code",
    "error_type",
    "outcome",
    "duration_s",
    "ttfc_s",
    "retry_delay_s",
    "input_tokens",
    "output_tokens",
    "provider_request_id",
    "queue_s",
)


@dataclass
class AttemptRecord:
    """One row of metrics per attempt. Never holds the API key, prompts or completions.

    ``outcome`` is ``ok``, ``retry`` (this attempt failed and another follows) or ``error``
    (this attempt failed and the call failed with it). ``queue_s`` is the time the attempt
    waited for admission before it was sent; it is the last field (added after the others), so
    code building records positionally keeps working, and ``None`` means "not known" (a
    record read from a metrics CSV written before the column existed).
    """

    timestamp: float
    request_id: str
    attempt: int
    operation: str
    method: str
    route: str
    server_address: str
    model: Optional[str]
    response_model: Optional[str]
    status_code: Optional[int]
    error_type: Optional[str]
    outcome: str
    duration_s: float
    ttfc_s: Optional[float]
    retry_delay_s: Optional[float]
    input_tokens: Optional[int]
    output_tokens: Optional[int]
    provider_request_id: Optional[str]
    queue_s: Optional[float] = None

    def as_tuple(self) -> tuple:
        """Values in :data:`ATTEMPT_FIELDS` order."""
        return tuple(getattr(self, name) for name in ATTEMPT_FIELDS)


#: Field order of a call record.
CALL_FIELDS = (
    "timestamp",
    "request_id",
    "operation",
    "method",
    "route",
    "server_address",
    "model",
    "attempts",
    "status_code",
    "error_type",
    "outcome",
    "duration_s",
    "input_tokens",
    "output_tokens",
    "queue_s",
    "wire_s",
    "backoff_s",
)


@dataclass
class CallRecord:
    """One record per finished call (all attempts and the waits between them).

    ``duration_s`` is the whole call, as the caller waited for it; ``queue_s``, ``wire_s`` and
    ``backoff_s`` say where that time went (the call's :class:`CallTiming`). They are the last
    fields, so code building records positionally keeps working; ``None`` means "not known".
    """

    timestamp: float
    request_id: str
    operation: str
    method: str
    route: str
    server_address: str
    model: Optional[str]
    attempts: int
    status_code: Optional[int]
    error_type: Optional[str]
    outcome: str
    duration_s: float
    input_tokens: Optional[int]
    output_tokens: Optional[int]
    queue_s: Optional[float] = None
    wire_s: Optional[float] = None
    backoff_s: Optional[float] = None


@runtime_checkable
class RetryPolicy(Protocol):
    """Decides, after a failed attempt, whether to try again and how long to wait.

    One object serves every thread of a client, so it must be thread-safe.

    A policy may also have a ``refusal_rules`` attribute (a :class:`cometkit.hints.RefusalRules`):
    which 429s it takes for a spent quota. The core parses every answer with it, so the limiter
    reads each 429 as the policy does; without one, the default lists apply.
    """

    def on_call_start(self, request: RequestInfo) -> None:
        """A new call begins (a retry budget earns credit here)."""

    def decide(self, result: AttemptResult) -> RetryDecision:
        """Called after every failed attempt (never after a success)."""
        ...


@runtime_checkable
class Limiter(Protocol):
    """Admission control before each attempt.

    ``acquire`` blocks (FIFO, without busy waiting) until the attempt may go out, and returns a
    permit; ``release`` is called exactly once per permit when the attempt ends (for a stream:
    when it is exhausted, closed or collected) with what happened, so an adaptive limiter can
    react to a 429. Must be thread-safe.
    """

    def acquire(self, request: RequestInfo, timeout_s: Optional[float] = None) -> Any:
        """Wait for admission; raise ``RateLimitError`` when ``timeout_s`` passes first.

        ``timeout_s`` is what is left of the call's deadline (``None``: the call has none);
        the core turns a refusal at the deadline into the call's deadline error."""
        ...

    def release(self, permit: Any, result: AttemptResult) -> Optional[Throttle]:
        """The attempt ended. For a 429 a limiter may answer with a :class:`Throttle` (the
        server still accepts: the call may wait its turn here); ``None`` says nothing."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class MetricsSink(Protocol):
    """Receives records. Exceptions raised here are logged once and counted, never raised
    into the call that produced the record."""

    def record_attempt(self, record: AttemptRecord) -> None: ...

    def record_call(self, record: CallRecord) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

