"""The sandbox: a rate-limited, fault-injecting CometAPI stand-in on loopback.

``with Sandbox(rpm=600) as sb:`` serves an OpenAI-compatible API at ``sb.base_url`` from a
background thread, so a client (or a test) can be driven against a provider that behaves like a
real one under load, without a key or a network. Standard library only, and lean per request:
benchmarks push thousands of calls through it.

This module is the lifecycle API: the :class:`Sandbox` object (its arguments checked and
turned into limits, faults and answer settings; start/stop, the context manager,
``base_url``, ``stats``). What a request is answered is
:mod:`~cometkit.sandbox._handler`'s job; the HTTP server under it is
:mod:`~cometkit.sandbox._http`'s.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Optional, Sequence

from ..clock import Clock, SystemClock
from . import responses
from ._handler import RequestHandler
from ._http import OpenConnections, Server, origin
from ._refusals import Refusals
from .faults import FaultPlan, FaultSpec
from .limits import HEADER_FAMILIES, WINDOW_ALIGNS, WINDOW_RETRY_AFTERS, RateLimits
from .stats import Counters

__all__ = ["Sandbox", "RETRY_AFTER_STYLES", "HEADER_FAMILIES", "WINDOW_ALIGNS",
           "WINDOW_RETRY_AFTERS", "IN_FLIGHT_STYLES", "OVERLOAD_STYLES", "CHOICES"]

log = logging.getLogger("cometkit.sandbox")

#: How a 429 tells the client when to come back.
RETRY_AFTER_STYLES = ("seconds", "ms", "date", "reset", "none")

#: How a 429 for ``max_in_flight`` is worded: as OpenAI would, or as LiteLLM's
#: ``max_parallel_requests`` limiter does (with its window as ``Retry-After``).
IN_FLIGHT_STYLES = ("openai", "litellm")
#: How a 429 for a bucket limit is worded: as OpenAI does, or as gateways built on new-api pass
#: an upstream overload on (``insufficient_quota`` that nonetheless means "try later").
OVERLOAD_STYLES = ("openai", "new-api")
#: The :class:`Sandbox` arguments that take one of a few words, and those words (the
#: command line offers the same choices).
CHOICES = {
    "retry_after": RETRY_AFTER_STYLES,
    "window_align": WINDOW_ALIGNS,
    "window_retry_after": WINDOW_RETRY_AFTERS,
    "ratelimit_headers": HEADER_FAMILIES,
    "in_flight_style": IN_FLIGHT_STYLES,
    "overload_style": OVERLOAD_STYLES,
}
#: ``in_flight_style="litellm"`` hints this by default: LiteLLM's default window, a minute.
LITELLM_IN_FLIGHT_RETRY_AFTER_S = 60.0


class Sandbox:
    """An OpenAI-compatible server on loopback that behaves like a provider under load.

    :param port: TCP port; 0 picks a free one (read it from :attr:`base_url`).
    :param host: interface to bind; loopback by default (never expose the sandbox).
    :param rpm: requests per minute per model (token bucket), ``None`` for no limit.
    :param rps: requests per second per model, an alternative to ``rpm``.
    :param tpm: tokens per minute per model; a request costs its prompt plus ``max_tokens``
        (or its answer when unset). The bucket holds one second's worth.
    :param burst: request bucket capacity; default one second's worth, at least 1.
    :param max_in_flight: requests per model served at once; more are answered 429.
    :param latency_s: added to every admitted request before it is answered.
    :param fault_rate: probability of an injected fault, spread over ``faults``.
    :param faults: fault kinds (see :data:`~cometkit.sandbox.faults.FAULT_KINDS`; default
        500, 502, 503, reset), or a mapping kind -> probability instead of ``fault_rate``.
    :param seed: seeds the fault draws, so a run repeats exactly.
    :param api_key: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
    :param retry_after: how a 429 hints the wait: ``seconds`` (``Retry-After: 2``), ``ms``
        (``retry-after-ms``), ``date`` (``Retry-After`` as an HTTP-date), ``reset`` (only
        ``x-ratelimit-reset-requests``) or ``none`` (no hint at all).
    :param models: what ``GET /v1/models`` lists (any model name is served).
    :param always_429: answer every API request 429 with a ``retry_after_value_s`` hint.
    :param retry_after_value_s: the wait hinted in ``always_429`` mode.
    :param slow_s: how late a ``slow`` fault answers.
    :param clock: the clock of the rate limits and HTTP dates; tests pass a fake one.
    :param window_requests: requests per model per fixed window of ``window_s`` (instead of
        ``rpm`` / ``rps``), as gateways count them.
    :param window_s: the window's length (default a minute).
    :param window_align: ``first_request`` (a window opens with the first request admitted
        after the previous one ended, as LiteLLM's proxy) or ``clock`` (``[k*W, (k+1)*W)`` of
        ``clock.time()``: a calendar minute, as LiteLLM's router).
    :param window_retry_after: what a window's 429 hints: ``left`` (the time left in it),
        ``window`` (its length, LiteLLM's inflated value) or ``none`` (no hint and no reset
        headers), rendered in the ``retry_after`` style.
    :param token_ratio: the sandbox's tokenizer counts this many times the chars/4 estimate for
        a prompt, in ``usage.prompt_tokens`` and in the ``tpm`` charge.
    :param token_window_s: enforce ``tpm`` per fixed window of this length
        (``tpm * token_window_s / 60`` tokens each) instead of a bucket.
    :param ratelimit_headers: the header names: one of :data:`HEADER_FAMILIES`.
    :param in_flight_style: how ``max_in_flight`` 429s are worded: one of
        :data:`IN_FLIGHT_STYLES`.
    :param in_flight_retry_after_s: the wait a ``max_in_flight`` 429 hints (default: the
        latency, at least 0.1 s, in ``openai`` style; a minute in ``litellm`` style).
    :param overload_style: how bucket-limit 429s are worded: one of :data:`OVERLOAD_STYLES`.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        burst: Optional[float] = None,
        max_in_flight: Optional[int] = None,
        latency_s: float = 0.0,
        fault_rate: float = 0.0,
        faults: FaultSpec = None,
        seed: Optional[int] = None,
        api_key: Optional[str] = None,
        retry_after: str = "seconds",
        models: Optional[Sequence[str]] = None,
        rps: Optional[float] = None,
        always_429: bool = False,
        retry_after_value_s: float = 1.0,
        slow_s: float = 5.0,
        clock: Optional[Clock] = None,
        window_requests: Optional[int] = None,
        window_s: Optional[float] = None,
        window_align: str = "first_request",
        window_retry_after: str = "left",
        token_ratio: float = 1.0,
        token_window_s: Optional[float] = None,
        ratelimit_headers: str = "openai",
        in_flight_style: str = "openai",
        in_flight_retry_after_s: Optional[float] = None,
        overload_style: str = "openai",
    ) -> None:
        for name, value in (("rpm", rpm), ("rps", rps), ("tpm", tpm), ("burst", burst)):
            _check_number(name, value)
        _check_number("max_in_flight", max_in_flight, integer=True)
        for name, value in (("latency_s", latency_s), ("slow_s", slow_s),
                            ("retry_after_value_s", retry_after_value_s)):
            _check_number(name, value, zero=True, optional=False)
        if rpm is not None and rps is not None:
            raise ValueError("give rpm or rps, not both")
        if burst is not None and rpm is None and rps is None:
            raise ValueError("burst needs rpm or rps")
        if retry_after not in RETRY_AFTER_STYLES:
            raise ValueError(f"retry_after must be one of {', '.join(RETRY_AFTER_STYLES)}")
        if api_key is not None and not api_key:
            raise ValueError("api_key must not be empty (pass None for no authentication)")
        _check_limit_shapes(locals())
        self.port = port
        self.host = host
        self.latency_s = float(latency_s)
        self.slow_s = float(slow_s)
        self.retry_after = retry_after
        self.retry_after_value_s = float(retry_after_value_s)
        self.always_429 = always_429
        self.models = tuple(models) if models is not None else responses.DEFAULT_MODELS
        self.clock: Clock = clock or SystemClock()
        self._config = {
            "rpm": rpm, "rps": rps, "tpm": tpm, "burst": burst, "max_in_flight": max_in_flight,
            "latency_s": self.latency_s, "fault_rate": fault_rate, "faults": faults,
            "seed": seed, "retry_after": retry_after, "always_429": always_429,
            "window_requests": window_requests, "window_s": window_s,
            "window_align": window_align, "window_retry_after": window_retry_after,
            "token_ratio": token_ratio, "token_window_s": token_window_s,
            "ratelimit_headers": ratelimit_headers, "in_flight_style": in_flight_style,
            "in_flight_retry_after_s": in_flight_retry_after_s, "overload_style": overload_style,
        }
        if in_flight_retry_after_s is None:
            in_flight_retry_after_s = (LITELLM_IN_FLIGHT_RETRY_AFTER_S
                                       if in_flight_style == "litellm"
                                       else max(self.latency_s, 0.1))
        limits: Optional[RateLimits] = None
        if rpm or rps or tpm or max_in_flight or window_requests:
            limits = RateLimits(
                requests_per_s=rpm / 60.0 if rpm else rps,
                request_burst=burst,
                request_limit=rpm if rpm else (rps * 60.0 if rps else None),
                tpm=tpm,
                max_in_flight=max_in_flight,
                in_flight_retry_s=float(in_flight_retry_after_s),
                monotonic=self.clock.monotonic,
                window_requests=window_requests,
                window_s=float(window_s or 60.0),
                token_window_s=token_window_s,
                window_align=window_align,
                window_retry_after=window_retry_after,
                header_family=ratelimit_headers,
                reset_on_refusal=retry_after != "none",
                wall_time=self.clock.time,
            )
        self._counters = Counters()
        self._stopping = threading.Event()
        self._requests = RequestHandler(
            counters=self._counters, limits=limits, faults=FaultPlan(fault_rate, faults),
            refusals=Refusals(retry_after, in_flight_style, overload_style, max_in_flight,
                              self.clock),
            seed=seed, clock=self.clock, origin=lambda: origin(self.address),
            stopping=self._stopping, api_key=api_key, latency_s=self.latency_s,
            slow_s=self.slow_s, always_429=always_429,
            retry_after_value_s=self.retry_after_value_s, models=self.models,
            token_ratio=float(token_ratio))
        self._connections = OpenConnections(self._counters.connection)
        self._httpd: Optional[Server] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Sandbox:
        """Bind and serve from a daemon thread. Raises ``OSError`` when the port is taken."""
        if self._httpd is not None:
            raise RuntimeError("the sandbox is already running")
        self._stopping.clear()
        httpd = Server((self.host, self.port), self._requests.serve, self._connections)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"cometkit-sandbox-{self.address[1]}", daemon=True)
        self._thread.start()
        log.debug("sandbox listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving: close the listener and every open connection, abandon slow answers."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        self._connections.cut_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.debug("sandbox stopped")

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def address(self) -> tuple:
        """``(host, port)`` the sandbox listens on."""
        if self._httpd is None:
            raise RuntimeError("the sandbox is not running; use start() or a with block")
        return self._httpd.server_address[:2]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: what a client takes as its base URL."""
        return f"{origin(self.address)}/v1"

    def describe(self) -> str:
        """The settings that differ from a plain echo server, for a log line."""
        defaults = {"latency_s": 0.0, "fault_rate": 0.0, "retry_after": "seconds",
                    "always_429": False, "window_align": "first_request",
                    "window_retry_after": "left", "token_ratio": 1.0,
                    "ratelimit_headers": "openai", "in_flight_style": "openai",
                    "overload_style": "openai"}
        parts = [f"{key}={int(value) if isinstance(value, float) and value.is_integer() else value}"
                 for key, value in self._config.items()
                 if value is not None and (key not in defaults or value != defaults[key])]
        return ", ".join(parts) or "no limits, no faults"

    def __repr__(self) -> str:
        where = self.base_url if self._httpd is not None else "stopped"
        return f"Sandbox({where}, {self.describe()})"

    # -- counters ----------------------------------------------------------------------------

    def stats(self) -> dict:
        """What the sandbox saw since it started or since :meth:`reset_stats`.

        Keys: ``attempts``; ``attempts_by_status`` (status code, or ``reset``, ``truncated``,
        ``aborted`` -> count); ``requests_by_model``; ``in_flight``; ``max_in_flight_seen``
        and ``max_in_flight_seen_by_model``; ``connections_accepted``; ``faults_injected``
        (kind -> count); ``rate_limited`` (``requests``, ``tokens``, ``window``,
        ``in_flight``, ``always`` -> count of 429s).
        """
        return self._counters.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (rate-limit buckets keep their state)."""
        self._counters.reset()


def _check_number(name: str, value: Any, *, integer: bool = False, zero: bool = False,
                  optional: bool = True) -> None:
    """Refuse anything but a finite positive number (or ``None`` when ``optional``; 0 when
    ``zero``) with a ``ValueError`` naming the argument, never a ``TypeError`` from comparing."""
    if value is None and optional:
        return
    if (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
            or not (0 <= value if zero else 0 < value) or not value < math.inf):
        kind = "an integer" if integer else "a finite number"
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be {kind} {bound}, not {value!r}")


def _check_limit_shapes(arguments: dict) -> None:
    """Refuse bad or contradictory limit-shape arguments of :class:`Sandbox`, by name.

    :raises ValueError: naming the argument.
    """
    def one_of(name: str, choices: tuple) -> None:
        if arguments[name] not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, "
                             f"not {arguments[name]!r}")

    _check_number("window_requests", arguments["window_requests"], integer=True)
    for name in ("window_s", "token_window_s", "in_flight_retry_after_s"):
        _check_number(name, arguments[name])
    _check_number("token_ratio", arguments["token_ratio"], optional=False)
    for name, choices in CHOICES.items():
        if name != "retry_after":  # refused before, in words of its own
            one_of(name, choices)
    windows = arguments["window_requests"] is not None or arguments["token_window_s"] is not None
    if arguments["window_requests"] is not None and (arguments["rpm"] is not None
                                                     or arguments["rps"] is not None):
        raise ValueError("give window_requests or rpm/rps, not both")
    if arguments["window_s"] is not None and arguments["window_requests"] is None:
        raise ValueError("window_s needs window_requests")
    if arguments["token_window_s"] is not None and arguments["tpm"] is None:
        raise ValueError("token_window_s needs tpm")
    for name, default in (("window_align", "first_request"), ("window_retry_after", "left")):
        if arguments[name] != default and not windows:
            raise ValueError(f"{name} needs window_requests or token_window_s")
    for name, default in (("in_flight_style", "openai"), ("in_flight_retry_after_s", None)):
        if arguments[name] != default and arguments["max_in_flight"] is None:
            raise ValueError(f"{name} needs max_in_flight")
    if arguments["overload_style"] != "openai" and not (
            arguments["rpm"] or arguments["rps"]
            or (arguments["tpm"] and arguments["token_window_s"] is None)):
        raise ValueError("overload_style needs a bucket limit: rpm, rps or tpm")
