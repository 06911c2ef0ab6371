"""What every ``cometkit`` subcommand shares: its exit codes, its messages on stderr, and the
one rule by which a flag's value is converted and checked (an argparse ``type``).

The subcommands live in their own modules (:mod:`cometkit._cli_batch`,
:mod:`cometkit._cli_report`, :mod:`cometkit._cli_plugins`, :mod:`cometkit.sandbox.cli`); the
parser that gathers them is :mod:`cometkit.cli`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, TypeVar

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_BUDGET", "EXIT_INTERRUPTED", "say",
           "error", "checked_value"]

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUDGET = 3
EXIT_INTERRUPTED = 130


def say(text: str) -> None:
    """One message on stderr (status, errors): stdout is kept for a command's product."""
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def error(text: str) -> int:
    """Say ``text`` as cometkit's usage error; the exit code to return."""
    say(f"cometkit: error: {text}")
    return EXIT_USAGE


def checked_value(text: str, convert: Callable[[str], T], unreadable: Optional[str] = None,
                  problem: Optional[Callable[[T], Optional[str]]] = None) -> T:
    """``convert(text)``, for an argparse ``type``: a ``ValueError`` from ``convert`` is the
    usage error ``unreadable`` (default: the ``ValueError``'s own message); a value for which
    ``problem`` gives a message is that usage error.

    :raises argparse.ArgumentTypeError: the text is not a valid value.
    """
    try:
        value = convert(text)
    except ValueError as exc:
        reason = str(exc) if unreadable is None else unreadable
        raise argparse.ArgumentTypeError(reason) from None
    reason = None if problem is None else problem(value)
    if reason is not None:
        raise argparse.ArgumentTypeError(reason)
    return value
