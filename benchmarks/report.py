"""The results table, the targets met or missed, and the machine they were measured on."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from typing import Any, Callable, Iterable, Optional, Sequence

from .runner import Check, Row

__all__ = ["machine", "table", "limits_table", "deadline_table", "budget_table",
           "priority_table", "checks",
           "results_markdown"]

#: Libraries whose versions are part of a result (absent ones are skipped).
LIBRARIES = ("cometkit", "requests", "urllib3", "pluggy", "openai", "httpx", "httpx2",
             "httpcore", "httpcore2", "pydantic")

COLUMNS = ("Benchmark", "Client", "Calls", "Threads", "Failed", "Wall s", "Calls/s",
           "x ideal", "CPU ms/call", "CPU x requests", "Attempts", "429s", "Conns",
           "Peak RSS MB")
#: The "share of the limit achieved" table (rows with a ``shape``).
LIMITS_COLUMNS = ("Limit shape", "Client", "Calls ok", "Wall s", "Ideal s", "x ideal",
                  "Attempts", "429s", "429s % of calls")
#: The deadline bound table (rows with a ``deadline_s``).
DEADLINE_COLUMNS = ("Case", "Client", "Calls ok", "Threads", "Deadline s", "Longest call s",
                    "Bound s", "Attempts", "Wall s")
#: The batch budget table (rows with a ``budget_tokens``).
BUDGET_COLUMNS = ("Case", "Client", "Lines", "Threads", "Batch tokens", "Budget", "Spent",
                  "Overshoot", "Lines sent", "Lines left", "Exit", "Resume sent")
#: The priority lanes table (rows with a ``priority_case``).
PRIORITY_COLUMNS = ("Case", "Client", "Calls ok", "Interactive calls", "Queue p50 ms",
                    "Queue p95 ms", "Queue max ms", "Send interval ms", "Batch wall s",
                    "Batch ideal s", "x ideal")
#: How far past its deadline a call may end (the bound the ``deadline`` rows check).
DEADLINE_SLACK_S = 0.25


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine() -> dict:
    """Where the numbers come from: CPU, cores, memory, Python, OS and library versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = f"{os.cpu_count()}" + (f" ({usable} usable)" if usable != os.cpu_count() else "")
    memory = _memory_gb()
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return {
        "Date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": _cpu_model(),
        "Cores": cores,
        "Memory": f"{memory:.1f} GB" if memory else "unknown",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "OS": platform.platform(),
        "Libraries": ", ".join(versions),
    }


def _number(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _failed(row: Row) -> str:
    if not row.errors:
        return str(row.failed)
    kinds = ", ".join(f"{name} {count}" for name, count in sorted(row.errors.items()))
    return f"{row.failed} ({kinds})"


def _baseline(row: Row, rows: Sequence[Row]) -> Optional[Row]:
    """The raw ``requests`` row of the same benchmark and thread count."""
    for other in rows:
        if other.baseline and other.bench == row.bench and other.threads == row.threads:
            return other
    return None


def _cells(row: Row, rows: Sequence[Row]) -> list:
    base = _baseline(row, rows)
    ratio = None
    if base is not None and row.cpu_ms_per_call is not None and base.cpu_ms_per_call:
        ratio = row.cpu_ms_per_call / base.cpu_ms_per_call
    return [row.bench, row.client, str(row.calls), str(row.threads), _failed(row),
            _number(row.wall_s, 2), _number(row.calls_per_s, 1), _number(row.vs_ideal, 2),
            _number(row.cpu_ms_per_call, 3), _number(ratio, 2),
            "" if row.attempts is None else str(row.attempts),
            "" if row.rate_limited is None else str(row.rate_limited),
            "" if row.connections is None else str(row.connections),
            _number(row.rss_mb, 1)]


def _markdown(header: Sequence[str], body: Iterable[Sequence[str]],
              text_columns: Sequence[int] = (0, 1, 4)) -> str:
    """A Markdown table padded to line up in a terminal too; the columns but
    ``text_columns`` are right-aligned numbers."""
    lines = [list(header), *[list(cells) for cells in body]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = [i not in text_columns for i in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        padded = (cell.rjust(w) if num else cell.ljust(w)
                  for cell, w, num in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([render(lines[0]), rule, *(render(line) for line in lines[1:])])


def table_rows(rows: Sequence[Row]) -> list:
    """The rows of the main table: not the limit shapes, the deadline bound, the batch budget
    or the priority lanes."""
    return [row for row in rows if row.shape is None and row.deadline_s is None
            and row.budget_tokens is None and row.priority_case is None]


def table(rows: Sequence[Row]) -> str:
    """One table for every benchmark but the limit shapes (see :func:`limits_table`); ratios
    are against raw ``requests`` in the same run."""
    rows = table_rows(rows)
    return _markdown(COLUMNS, (_cells(row, rows) for row in rows))


def _calls_ok(row: Row) -> str:
    if row.timed_out_s is not None:
        return f"over its {row.timed_out_s:.0f} s cap"
    kinds = ", ".join(f"{name} {count}" for name, count in sorted(row.errors.items()))
    return f"{row.ok}/{row.calls}" + (f" ({kinds})" if kinds else "")


def _limits_cells(row: Row) -> list:
    share = None if row.rate_limited is None or not row.calls else row.rate_limited / row.calls
    return [row.shape or "", row.client, _calls_ok(row), _number(row.wall_s, 2),
            _number(row.ideal_wall_s, 2),
            "" if row.timed_out_s is not None else _number(row.vs_ideal, 2),
            "" if row.attempts is None else str(row.attempts),
            "" if row.rate_limited is None else str(row.rate_limited),
            "" if share is None else f"{share:.0%}"]


def _own_table(rows: Sequence[Row], keep: Callable[[Row], bool], columns: Sequence[str],
               cells: Callable[[Row], list]) -> str:
    """A table of its own for the rows ``keep`` selects; "" when there are none."""
    kept = [row for row in rows if keep(row)]
    if not kept:
        return ""
    return _markdown(columns, (cells(row) for row in kept), text_columns=(0, 1, 2))


def limits_table(rows: Sequence[Row]) -> str:
    """The share of the limit achieved: one row per limit shape and client ("" when the run
    measured no limit shape)."""
    return _own_table(rows, lambda row: row.shape is not None, LIMITS_COLUMNS, _limits_cells)


def _deadline_cells(row: Row) -> list:
    assert row.deadline_s is not None
    return [str(row.info.get("case", row.key)), row.client, _calls_ok(row), str(row.threads),
            _number(row.deadline_s, 2), _number(row.info.get("max_call_s"), 3),
            _number(row.deadline_s + DEADLINE_SLACK_S, 2),
            "" if row.attempts is None else str(row.attempts), _number(row.wall_s, 2)]


def deadline_table(rows: Sequence[Row]) -> str:
    """The deadline bound: one row per case, its longest call against D + 0.25 s ("" when
    the run measured none)."""
    return _own_table(rows, lambda row: row.deadline_s is not None, DEADLINE_COLUMNS,
                      _deadline_cells)


def _budget_cells(row: Row) -> list:
    assert row.budget_tokens is not None
    info = row.info
    return [str(info.get("case", row.key)), row.client, str(row.calls), str(row.threads),
            f"{info['all_tokens']:,}", f"{row.budget_tokens:,}", f"{info['spent']:,}",
            f"{max(0, info['spent'] - row.budget_tokens):,}", str(row.ok), str(info["left"]),
            str(info["exit"]), str(info["resent"])]


def budget_table(rows: Sequence[Row]) -> str:
    """The batch budget: one row per case, what was spent against a budget of half the
    batch's tokens ("" when the run measured none)."""
    return _own_table(rows, lambda row: row.budget_tokens is not None, BUDGET_COLUMNS,
                      _budget_cells)
def _ms(seconds: Optional[float]) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f}"


def _priority_cells(row: Row) -> list:
    info = row.info
    return [str(row.priority_case), row.client, _calls_ok(row),
            str(info.get("interactive_calls", "")), _ms(info.get("queue_p50_s")),
            _ms(info.get("queue_p95_s")), _ms(info.get("queue_max_s")),
            _ms(info.get("send_interval_s")), _number(row.wall_s, 2),
            _number(row.ideal_wall_s, 2), _number(row.vs_ideal, 3)]


def priority_table(rows: Sequence[Row]) -> str:
    """The priority lanes: the interactive calls' admission waits and the batch's time, one
    row per case ("" when the run measured none)."""
    return _own_table(rows, lambda row: row.priority_case is not None, PRIORITY_COLUMNS,
                      _priority_cells)


def checks(results: Sequence[Check]) -> str:
    """The issue's targets, one line each: met, missed, or for information."""
    marks = {True: "met", False: "MISSED", None: "info"}
    return "\n".join(f"- {marks[c.passed]} [{c.bench}] {c.target}: {c.measured}"
                     for c in results)


def results_markdown(rows: Sequence[Row], results: Sequence[Check], *, command: str,
                     host: dict, elapsed_s: float) -> str:
    """The whole of ``benchmarks/RESULTS.md``."""
    facts = "\n".join(f"| {key} | {value} |" for key, value in host.items())
    missed = sum(1 for c in results if c.passed is False)
    verdict = (f"**{missed} target(s) missed.**" if missed else "All targets met.")
    parts: list[Any] = [
        "# Benchmark results",
        "",
        f"Latest run of `{command}` ({elapsed_s / 60:.1f} min). How to run it and how to read "
        "the columns: [README.md](README.md).",
        "",
        "| Machine | |",
        "|---|---|",
        facts,
        "",
        "## Results",
        "",
        *([table(rows), ""] if table_rows(rows) else []),
        *(["## Share of the limit achieved", "", limits_table(rows), ""]
          if limits_table(rows) else []),
        *(["## Deadline bound", "", deadline_table(rows), ""] if deadline_table(rows) else []),
        *(["## Batch budget", "", budget_table(rows), ""] if budget_table(rows) else []),
        *(["## Priority lanes", "", priority_table(rows), ""] if priority_table(rows) else []),
        "## Targets",
        "",
        verdict,
        "",
        checks(results),
        "",
    ]
    return "\n".join(parts)
