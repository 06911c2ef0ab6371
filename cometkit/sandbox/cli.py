"""``cometkit sandbox``: serve the sandbox on 127.0.0.1 until Ctrl-C.

One table maps each command-line flag to its :class:`~cometkit.sandbox.Sandbox` argument,
both ways: arguments -> keyword arguments for ``cometkit sandbox``, keyword arguments ->
arguments for :class:`~cometkit.sandbox.SandboxProcess`, which runs this command in a child.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .._cli_common import checked_value
from ..hints import parse_duration
from .faults import FAULT_KINDS, format_faults, parse_faults
from .server import CHOICES, Sandbox

__all__ = ["add_arguments", "run", "sandbox_kwargs", "to_argv", "DESCRIPTION"]

DESCRIPTION = ("Serve an OpenAI-compatible API on 127.0.0.1 that behaves like a rate-limited "
               "provider: deterministic echo answers, 429s with Retry-After, injected faults.")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return checked_value(text, kind, f"not a number: {text!r}",
                             lambda value: None if value > 0 else f"must be positive: {text!r}")
    convert.__name__ = kind.__name__
    return convert


def _duration(text: str) -> float:
    value = parse_duration(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 50ms, 1.5s, 0.2)")
    return value


def _probability(text: str) -> float:
    return checked_value(text, float, f"not a number: {text!r}",
                         lambda value: (None if 0.0 <= value <= 1.0
                                        else f"must be between 0 and 1: {text!r}"))


def _faults(text: str) -> Any:
    return checked_value(text, parse_faults)


def _models(text: str) -> list:
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclass(frozen=True)
class _Flag:
    kwarg: str
    flag: str
    parse: Optional[Callable[[str], Any]]  # None: a switch
    format: Callable[[Any], str]
    help: str
    metavar: Optional[str] = None


_FLAGS = (
    _Flag("host", "--host", str, str, "interface to bind (default: 127.0.0.1)"),
    _Flag("rpm", "--rpm", _positive(float), repr,
          "requests per minute per model (default: no limit)", "N"),
    _Flag("rps", "--rps", _positive(float), repr,
          "requests per second per model, instead of --rpm (default: no limit)", "N"),
    _Flag("tpm", "--tpm", _positive(float), repr,
          "tokens per minute per model, prompt + max_tokens (default: no limit)", "N"),
    _Flag("burst", "--burst", _positive(float), repr,
          "request bucket size (default: one second of --rpm/--rps, at least 1)", "N"),
    _Flag("max_in_flight", "--max-in-flight", _positive(int), str,
          "requests per model served at once (default: no limit)", "N"),
    _Flag("latency_s", "--latency", _duration, repr,
          "added to each answer, e.g. 50ms (default: 0)", "DURATION"),
    _Flag("fault_rate", "--fault-rate", _probability, repr,
          "probability of an injected fault, e.g. 0.02 (default: 0)", "P"),
    _Flag("faults", "--faults", _faults, format_faults,
          "kinds --fault-rate is spread over, or kind=probability pairs "
          f"(kinds: {', '.join(FAULT_KINDS)}; default: 500,502,503,reset)", "SPEC"),
    _Flag("seed", "--seed", int, str, "seed of the fault draws (default: random)", "S"),
    _Flag("retry_after", "--retry-after", str, str,
          "how a 429 hints the wait (default: seconds)"),
    _Flag("retry_after_value_s", "--retry-after-value", _duration, repr,
          "the wait hinted by --always-429 (default: 1s)", "DURATION"),
    _Flag("always_429", "--always-429", None, str,
          "answer every API request 429 (default: off)"),
    _Flag("slow_s", "--slow", _duration, repr,
          "how late a 'slow' fault answers (default: 5s)", "DURATION"),
    _Flag("models", "--models", _models, ",".join,
          "comma-separated models GET /v1/models lists "
          "(default: gpt-4o-mini,claude-3-5-haiku,text-embedding-3-small)", "LIST"),
    _Flag("window_requests", "--window-requests", _positive(int), str,
          "requests per model per fixed window of --window, instead of --rpm/--rps", "N"),
    _Flag("window_s", "--window", _duration, repr,
          "length of the --window-requests window, e.g. 10s (default: 60s)", "DURATION"),
    _Flag("window_align", "--window-align", str, str,
          "when a window opens (default: first_request)"),
    _Flag("window_retry_after", "--window-retry-after", str, str,
          "what a window's 429 hints (default: left)"),
    _Flag("token_ratio", "--token-ratio", _positive(float), repr,
          "the sandbox's prompt tokens per chars/4 estimated token (default: 1)", "R"),
    _Flag("token_window_s", "--token-window", _duration, repr,
          "enforce --tpm per fixed window of this length, e.g. 60s (default: a bucket)",
          "DURATION"),
    _Flag("ratelimit_headers", "--ratelimit-headers", str, str,
          "rate-limit header names (default: openai)"),
    _Flag("in_flight_style", "--in-flight-style", str, str,
          "wording of --max-in-flight 429s (default: openai)"),
    _Flag("in_flight_retry_after_s", "--in-flight-retry-after", _duration, repr,
          "wait hinted by --max-in-flight 429s (default: latency, or 60s for litellm)",
          "DURATION"),
    _Flag("overload_style", "--overload-style", str, str,
          "wording of bucket-limit 429s (default: openai)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox's options to ``parser`` (``cometkit sandbox`` or ``python -m``)."""
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port, 0 for any free one (default: 8000)")
    for flag in _FLAGS:
        if flag.parse is None:
            parser.add_argument(flag.flag, dest=flag.kwarg, action="store_true", default=None,
                                help=flag.help)
        else:
            parser.add_argument(flag.flag, dest=flag.kwarg, type=flag.parse, default=None,
                                metavar=flag.metavar, choices=CHOICES.get(flag.kwarg),
                                help=flag.help)
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="require 'Authorization: Bearer $VAR' (default: no key needed)")
    # SandboxProcess reads the URL from stdout; a person reads the stderr line.
    parser.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)


def sandbox_kwargs(args: argparse.Namespace) -> dict:
    """:class:`~cometkit.sandbox.Sandbox` keyword arguments for parsed ``args``.

    :raises ValueError: when ``--api-key-env`` names an unset variable.
    """
    kwargs: dict = {"port": args.port}
    for flag in _FLAGS:
        value = getattr(args, flag.kwarg, None)
        if value is not None:
            kwargs[flag.kwarg] = value
    if getattr(args, "api_key_env", None):
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is not set")
        kwargs["api_key"] = key
    return kwargs


def to_argv(**kwargs: Any) -> list:
    """Arguments for ``python -m cometkit.sandbox`` that recreate these Sandbox ``kwargs``.

    ``api_key`` is not accepted (it would show in the process list): pass it in an
    environment variable with ``--api-key-env``.

    :raises TypeError: for a keyword with no flag (``clock``, ``api_key``...).
    """
    argv = []
    if "port" in kwargs:
        argv += ["--port", str(int(kwargs.pop("port")))]
    by_kwarg = {flag.kwarg: flag for flag in _FLAGS}
    for name, value in kwargs.items():
        flag = by_kwarg.get(name)
        if flag is None:
            raise TypeError(f"no command-line flag for Sandbox argument {name!r}")
        if value is None or (flag.parse is None and not value):
            continue
        argv += [flag.flag] if flag.parse is None else [flag.flag, flag.format(value)]
    return argv


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C (or SIGTERM). Exit 0 after a clean stop, 2 on bad options."""
    try:
        sandbox = Sandbox(**sandbox_kwargs(args))
    except ValueError as exc:
        print(f"cometkit sandbox: {exc}", file=sys.stderr)
        return 2
    try:
        sandbox.start()
    except OSError as exc:
        print(f"cometkit sandbox: cannot listen on port {args.port}: {exc}", file=sys.stderr)
        return 1
    restore = _stop_on_sigterm()
    try:
        print(f"cometkit sandbox listening on {sandbox.base_url} ({sandbox.describe()}); "
              "Ctrl-C to stop", file=sys.stderr, flush=True)
        if args.announce:
            print(f"listening on {sandbox.base_url}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
        restore()
    return 0


def _stop_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM stop the server like Ctrl-C (SandboxProcess terminates its child so)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)
