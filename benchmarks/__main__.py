"""``python -m benchmarks``: run the benchmarks, print one table, write ``RESULTS.md``.

Run it from the repository root after ``pip install -e '.[bench]'``. See ``README.md`` here.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import budget, deadline, faults, goodput, limits, memory, overhead, priority, scaling
from .report import (
    budget_table,
    checks,
    deadline_table,
    limits_table,
    machine,
    priority_table,
    results_markdown,
    table,
    table_rows,
)

#: In the order they run (and appear in the tables).
BENCHMARKS = {module.NAME: module
              for module in (overhead, goodput, faults, scaling, memory, limits, deadline,
                             budget, priority)}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _names(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare cometkit with raw requests, urllib3, the openai SDK and the "
                    "CometAPI guide's recipes on the same workloads against the sandbox.")
    p.add_argument("--only", type=_names, action="extend", metavar="NAMES", default=[],
                   help=f"comma-separated benchmarks to run (default: all of "
                        f"{', '.join(BENCHMARKS)})")
    p.add_argument("--quick", action="store_true",
                   help="smaller workloads: about eight minutes instead of about fifty")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help=f"write the results there (default: {RESULTS.name} next to this "
                        "package, for a full run of every benchmark only)")
    p.add_argument("--no-write", action="store_true", help="print the results, write no file")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if a target is missed")
    return p


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    names = list(dict.fromkeys(args.only)) or list(BENCHMARKS)
    if importlib.util.find_spec("openai") is None:
        _log("benchmarks: the openai SDK is one of the contenders; install it with "
             "pip install -e '.[bench]'")
        return 2
    started = time.perf_counter()
    rows, results = [], []
    for name in BENCHMARKS:
        if name not in names:
            continue
        _log(f"== {BENCHMARKS[name].TITLE}")
        try:
            suite = BENCHMARKS[name].run(args.quick, _log)
        except RuntimeError as exc:  # a BenchmarkError, or a sandbox that did not start
            _log(f"benchmarks: {name} failed: {exc}")
            return 2
        rows += suite.rows
        results += suite.checks
    elapsed_s = time.perf_counter() - started
    if table_rows(rows):
        print(table(rows))
        print()
    for extra in (limits_table(rows), deadline_table(rows), budget_table(rows),
                  priority_table(rows)):
        if extra:
            print(extra)
            print()
    print(checks(results))
    output = args.output
    if output is None and not args.no_write and not args.quick and names == list(BENCHMARKS):
        output = RESULTS
    if output is not None and not args.no_write:
        given = sys.argv[1:] if argv is None else list(argv)
        command = shlex.join(["python", "-m", "benchmarks", *given])
        output.write_text(results_markdown(rows, results, command=command, host=machine(),
                                           elapsed_s=elapsed_s), encoding="utf-8")
        _log(f"benchmarks: results written to {output}")
    missed = any(check.passed is False for check in results)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
