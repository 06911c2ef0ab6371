"""The ``cometkit`` command: ``batch``, ``report``, ``sandbox``, ``plugins``, ``config check``.

This module (with the subcommands' own modules) is the only part of cometkit that writes to the
terminal. It builds the parser from the subcommands' modules -- ``batch``
(:mod:`cometkit._cli_batch`), ``report`` (:mod:`cometkit._cli_report`), ``sandbox``
(:mod:`cometkit.sandbox.cli`), ``plugins`` and ``config check`` (:mod:`cometkit._cli_plugins`)
-- and runs the one named. Exit codes (:mod:`cometkit._cli_common`): 0 success, 1 some requests
of a batch failed, 2 usage, configuration or input errors (nothing was sent), 3 a batch reached
its budget (the rest was not sent), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Optional, Sequence

from . import _cli_batch, _cli_plugins, _cli_report
from ._cli_common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, error, say
from ._exceptions import CometError
from ._version import __version__

__all__ = ["main", "build_parser"]

_log_handler: Optional[logging.Handler] = None


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox.cli import run

    return int(run(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cometkit",
        description="A thread-pool client for CometAPI: resumable batches, a local sandbox, "
                    "metrics reports.")
    parser.add_argument("--version", action="version", version=f"cometkit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more on stderr (-v: info, -vv: debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    _cli_batch.add_parser(commands)
    _cli_report.add_parser(commands)

    from .sandbox.cli import add_arguments as add_sandbox_arguments

    sandbox = commands.add_parser(
        "sandbox", help="serve the built-in OpenAI-compatible sandbox on 127.0.0.1",
        description="A rate-limited, fault-injecting CometAPI stand-in for offline tests.")
    add_sandbox_arguments(sandbox)
    sandbox.set_defaults(handler=_cmd_sandbox)

    _cli_plugins.add_parsers(commands)
    return parser


def _configure_logging(verbosity: int) -> None:
    global _log_handler
    logger = logging.getLogger("cometkit")
    if _log_handler is None:
        _log_handler = logging.StreamHandler()  # sys.stderr at the time of each write
        _log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(_log_handler)
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 \
        else logging.DEBUG
    logger.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``cometkit`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.argv = argv
    _configure_logging(args.verbose)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        say("cometkit: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `cometkit report x.csv | head`: stop quietly
        with contextlib.suppress(OSError, ValueError):  # no traceback from the exit flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except CometError as exc:
        return error(str(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
