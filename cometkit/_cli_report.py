"""``cometkit report``: the per-model table (or JSON, and a plot) of a metrics CSV.

The numbers are :class:`cometkit.summary.Summary`'s, read from the CSV the ``csv_metrics``
plugin wrote, at the configuration's prices; the plot is :mod:`cometkit._plot`, filled from the
same single read of the file. This module is the command around them: its flags, its output
(the product on stdout, notes on stderr) and its errors.
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Any

from ._cli_common import EXIT_OK, error, say
from ._exceptions import ConfigError
from .config import load_config
from .prices import PriceTable

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """``cometkit report``; returns the exit code."""
    from .summary import Summary

    if args.plot:
        from ._plot import MissingMatplotlib, require_matplotlib

        try:
            require_matplotlib()
        except MissingMatplotlib as exc:
            return error(str(exc))
    try:
        prices = PriceTable(load_config(args.config).data.get("prices"))
    except ConfigError as exc:
        return error(str(exc))
    series = None
    if args.plot:
        from ._plot import Series

        series = Series()
    try:  # one read of the file, for the table and the plot
        summary = Summary.from_csv(args.csv, prices=prices,
                                   also=None if series is None else series.add)
    except FileNotFoundError:
        return error(f"{args.csv}: no such file")
    except OSError as exc:
        return error(f"{args.csv}: cannot read it: {exc.strerror or exc}")
    except ValueError as exc:  # names the file and line itself
        return error(str(exc))
    if args.json:
        import json

        sys.stdout.write(json.dumps(summary.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(summary.format_table())
    sys.stdout.flush()
    if summary.skipped_rows:
        say(f"cometkit report: {summary.skipped_rows} unreadable row(s) skipped (a run cut "
            "short leaves one)")
    if series is not None:
        from ._plot import plot_metrics

        try:
            plot_metrics(series, args.plot, source=args.csv)
        except (OSError, ValueError, csv.Error) as exc:
            return error(f"cannot write the plot {args.plot}: {exc}")
        say(f"cometkit report: plot written to {args.plot}")
    return EXIT_OK


def add_parser(commands: Any) -> None:
    """Add ``cometkit report`` to the subcommands ``commands`` (argparse's subparsers)."""
    report = commands.add_parser(
        "report", help="per-model table (and plot) from a metrics CSV",
        description="Summarise a metrics CSV written by the csv_metrics plugin.")
    report.add_argument("csv", metavar="METRICS.csv")
    report.add_argument("--plot", metavar="PNG",
                        help="also draw calls/s, 429s, latency and concurrency over time "
                             "(needs the 'plot' extra: pip install 'cometkit[plot]')")
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    report.add_argument("--config", metavar="FILE",
                        help="YAML configuration whose prices: give each model's cost "
                             "(default: $COMETKIT_CONFIG)")
    report.set_defaults(handler=run)
