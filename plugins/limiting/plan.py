"""The limiting plan both stores carry out: its options, and the arithmetic of its rates, lane
caps and token charges (the token estimate is the core's, :mod:`cometkit.tokens`, which a
batch budget reserves too).

The in-process store (:mod:`.local`) and the Redis store (:mod:`.redis_store`) enforce the same
plan, and adaptive mode is one policy (:mod:`.adaptive`) in both; what differs is only where
the state lives. Anything both stores compute is computed here, once.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional, TypeVar

from cometkit import AttemptResult, ConfigError, Option
from cometkit.options import validate_section
from cometkit.tokens import CHARS_PER_TOKEN, estimate_parts, estimate_tokens

__all__ = [
    "admission_timeout",
    "CHARS_PER_TOKEN",
    "OPTIONS",
    "estimate_parts",
    "estimate_tokens",
    "paced_rate",
    "lane_cap",
    "charged_tokens",
    "token_refund",
    "factory_kwargs",
    "concurrency_number",
    "tokens_limited",
    "starvation_credit",
    "OVERTAKE_CREDIT",
    "model_section",
    "PlanSettings",
]

_MODEL_OPTIONS = {
    "max_concurrency": Option(
        "int", minimum=1, nullable=True,
        help="Attempts of this model in flight at once (within the client's max_concurrency)."),
    "requests_per_minute": Option(
        "float", minimum=1, nullable=True,
        help="Requests per minute for this model, on top of the client-wide limit."),
    "tokens_per_minute": Option(
        "float", minimum=1, nullable=True,
        help="Tokens per minute for this model (estimated before the call, corrected after)."),
}

#: The ``plugins.limiter`` section.
OPTIONS = {
    "max_concurrency": Option(
        "int", None, minimum=1, nullable=True,
        help="Attempts in flight at once; null means the client's concurrency."),
    "requests_per_minute": Option(
        "float", None, minimum=1, nullable=True,
        help="Requests per minute for the whole client, spread evenly; null means no limit.",
        example=1200),
    "tokens_per_minute": Option(
        "float", None, minimum=1, nullable=True,
        help="Tokens per minute (prompt characters / 4 + max_tokens before the call, "
             "corrected from usage after); null means no limit.", example=200000),
    "burst": Option(
        "float", 1.0, minimum=0, maximum=60,
        help="Seconds' worth of requests_per_minute / tokens_per_minute that may go out at "
             "once after a quiet spell."),
    "adaptive": Option(
        "bool", True,
        help="Learn the server's limits from 429s and rate-limit headers: cut concurrency "
             "and send rate, hold for Retry-After, grow back slowly."),
    "safety_margin": Option(
        "float", 0.02, minimum=0, maximum=0.5,
        help="Share of requests_per_minute / tokens_per_minute kept unused, so timing "
             "jitter against the server's bucket does not earn 429s."),
    "window": Option(
        "float", None, minimum=0.001, maximum=86400, nullable=True,
        help="Seconds of a fixed window the server counts requests_per_minute in (its quota, "
             "requests_per_minute * window / 60, goes out together when a window opens); null "
             "means a smooth rate. Adaptive mode recognises windows by itself.", example=60),
    "window_align": Option(
        "str", "first_request", choices=("first_request", "clock"),
        help="'first_request': a window opens with the first request after the last one "
             "ended (LiteLLM's proxy); 'clock': windows follow the wall clock (a calendar "
             "minute for window: 60)."),
    "starvation_share": Option(
        "float", 0.1, minimum=0, maximum=1,
        help="Share of admissions that may go to the oldest waiting call of a lower priority "
             "lane while a higher one waits, once it has waited starvation_s: a lower lane "
             "is slowed, never stopped. 0: strict priority."),
    "starvation_s": Option(
        "float", 5.0, minimum=0, maximum=86400,
        help="Seconds a call of a lower priority lane waits before it may take its "
             "starvation_share of admissions ahead of higher lanes."),
    "acquire_timeout": Option(
        "float", None, minimum=0, nullable=True,
        help="Seconds an attempt may wait for admission before failing with "
             "RateLimitError; null waits as long as it takes.", example=60),
    "models": Option(
        "mapping", {}, children=_MODEL_OPTIONS,
        help="Per-model limits, by model name; a call must fit both its model's and the "
             "client's.", example={"gpt-4o": {"requests_per_minute": 500}}),
}


# -------------------------------------------------------------------------------------------
# Arithmetic both stores share
# -------------------------------------------------------------------------------------------


def admission_timeout(acquire_timeout: Optional[float],
                      timeout_s: Optional[float]) -> Optional[float]:
    """How long one ``acquire`` may wait: the shorter of the configured ``acquire_timeout``
    and what the caller gives (the time left of the call's deadline); ``None``: no limit."""
    if acquire_timeout is None:
        return timeout_s
    return acquire_timeout if timeout_s is None else min(acquire_timeout, timeout_s)


def paced_rate(per_minute: Optional[float], burst: float,
               margin: float) -> Optional[tuple[float, float]]:
    """``(rate per second, capacity)`` of a configured per-minute rate: less ``margin``, a
    bucket of ``burst`` seconds' worth and at least one whole request (or token), or nothing
    could ever be admitted. ``None`` for no limit."""
    if per_minute is None:
        return None
    rate = per_minute / 60.0 * (1.0 - margin)
    return rate, max(1.0, burst * rate)


def model_section(models: Mapping[str, Mapping[str, Any]],
                  model: Optional[str]) -> Mapping[str, Any]:
    """The ``models:`` section of ``model`` (empty for a model without one, or no model)."""
    return models.get(model, {}) if model is not None else {}


def lane_cap(max_concurrency: int, models: Mapping[str, Mapping[str, Any]],
             model: Optional[str]) -> int:
    """Attempts of ``model`` allowed in flight: its ``models:`` cap, within the client's."""
    section = model_section(models, model)
    return min(max_concurrency, section.get("max_concurrency") or max_concurrency)


def charged_tokens(result: AttemptResult, answer_reserved: int) -> Optional[int]:
    """What the server charged for an answered call, as providers count it: the prompt it
    counted plus the larger of the reserved ``max_tokens`` and the answer; ``None`` without
    ``usage``."""
    if result.input_tokens is None and result.output_tokens is None:
        return None
    return (result.input_tokens or 0) + max(answer_reserved, result.output_tokens or 0)


def token_refund(cost: int, result: AttemptResult, answer_reserved: int) -> Optional[int]:
    """Tokens to give back to the buckets an attempt estimated at ``cost`` was charged to: the
    estimate less what the server charged (negative: it charged more); the whole estimate for
    an error answer without ``usage`` (the server counted nothing); ``None`` when nothing is
    known yet (no answer, or an answer without ``usage``)."""
    charged = charged_tokens(result, answer_reserved)
    if charged is not None:
        return cost - charged
    if result.status_code is not None and result.status_code >= 400:
        return cost
    return None


def starvation_credit(credit: float, share: float) -> float:
    """The credit of lower priority lanes after one more admission: ``share`` more, at most
    one admission's worth. A starving waiter may overtake a higher lane only with a whole
    credit (and spends it), so at most one admission in ``1 / share`` overtakes, and a long
    spell without contention never saves up a burst of overtakes."""
    return min(1.0, credit + share)


#: A credit this close to a whole one is whole (ten additions of 0.1 make 0.9999999999999999).
OVERTAKE_CREDIT = 1.0 - 1e-9


def factory_kwargs(options: Mapping[str, Any], schema: Mapping[str, Option],
                   concurrency: int) -> dict[str, Any]:
    """Constructor keywords from a validated section: its own keys only, and a null
    ``max_concurrency`` meaning ``concurrency`` (the client's pool size)."""
    kwargs = {key: value for key, value in options.items() if key in schema}
    if kwargs.get("max_concurrency") is None:
        kwargs["max_concurrency"] = concurrency
    return kwargs


def concurrency_number(max_concurrency: Optional[int], plugin: str, store: str) -> int:
    """A store's ``max_concurrency``, which its constructor needs as a number: ``null`` means
    the client's concurrency only in a section that :func:`factory_kwargs` turned into
    constructor keywords."""
    if max_concurrency is None:
        raise ConfigError(f"{plugin}.max_concurrency: {store} needs a number "
                          "(from_options() turns null into the client's concurrency)",
                          key="max_concurrency")
    return int(max_concurrency)


def tokens_limited(tokens_per_minute: Optional[float],
                   models: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a configured token rate applies to some call (client-wide or one model's), so
    that every admission must be estimated and charged in tokens."""
    return tokens_per_minute is not None or any(
        section.get("tokens_per_minute") is not None for section in models.values())


_Store = TypeVar("_Store", bound="PlanSettings")


class PlanSettings:
    """The plan's settings as both stores hold them, checked as the configuration is.

    A store names its section (:attr:`SCHEMA`), its plugin (:attr:`PLUGIN`) and itself
    (:attr:`STORE`) for messages; its constructor hands its values to :meth:`_checked`, then
    to :meth:`_keep_plan`.
    """

    SCHEMA: ClassVar[Mapping[str, Option]]
    PLUGIN: ClassVar[str]
    STORE: ClassVar[str]

    max_concurrency: int
    requests_per_minute: Optional[float]
    tokens_per_minute: Optional[float]
    burst: float
    adaptive: bool
    safety_margin: float
    acquire_timeout: Optional[float]
    models: dict[str, dict[str, Any]]

    @classmethod
    def from_options(cls: type[_Store], options: Mapping[str, Any], *, concurrency: int,
                     **context: Any) -> _Store:
        """Build from a validated section of the store's plugin; a null ``max_concurrency``
        means ``concurrency`` (the client's pool size). ``context``: the store's keywords
        that are not options (``clock``, and the Redis store's ``namespace`` and ``rng``)."""
        return cls(**factory_kwargs(options, cls.SCHEMA, concurrency), **context)

    def _checked(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor's ``values``, checked against the section the configuration is
        checked against (so direct construction is checked too)."""
        return validate_section(self.SCHEMA, values, where=f"<{self.STORE}>",
                                key_path=self.PLUGIN)

    def _keep_plan(self, values: Mapping[str, Any]) -> None:
        """Keep the settings both stores share, from the constructor's checked ``values``."""
        self.max_concurrency = concurrency_number(values["max_concurrency"], self.PLUGIN,
                                                  self.STORE)
        self.requests_per_minute = values["requests_per_minute"]
        self.tokens_per_minute = values["tokens_per_minute"]
        self.burst = float(values["burst"])
        self.adaptive = bool(values["adaptive"])
        self.safety_margin = float(values["safety_margin"])
        self.acquire_timeout = values["acquire_timeout"]
        self.models = {name: dict(section) for name, section in values["models"].items()}
