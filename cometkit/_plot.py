"""``cometkit report --plot``: one PNG of a run, from its metrics CSV.

Three panels over the run's time, sharing the x axis (seconds since the first attempt began):

1. throughput: finished calls per second, failed calls per second, and 429 answers per second;
2. call latency: p50 / p95 / p99 of the calls that finished in each time bin (a call's latency
   is its attempts' durations plus the back-off sleeps between them, as in the summary table);
3. concurrency: attempts in flight, from each attempt's start (``timestamp - duration_s``, the
   CSV timestamp being the attempt's end) to its end.

matplotlib is an optional dependency (``pip install 'cometkit[plot]'``).
"""

from __future__ import annotations

import csv
import math
from array import array
from typing import Any

from .summary import parse_timestamp

__all__ = ["MissingMatplotlib", "require_matplotlib", "plot_metrics", "read_series"]

#: Time bins of the throughput and latency panels (at least one second each).
TARGET_BINS = 120


class MissingMatplotlib(ImportError):
    """``--plot`` without matplotlib installed."""


def require_matplotlib() -> Any:
    """The ``matplotlib`` module set to the file-only Agg backend.

    :raises MissingMatplotlib: with the command that installs it.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingMatplotlib(
            f"--plot needs matplotlib, which is not installed ({exc}). Install the plot "
            "extra:  pip install 'cometkit[plot]'  (or: pip install matplotlib)") from None
    matplotlib.use("Agg")
    return matplotlib


class Series:
    """The columns of a metrics CSV that the plot needs, in compact arrays."""

    def __init__(self) -> None:
        self.start = array("d")      # every attempt: start and end, epoch seconds
        self.end = array("d")
        self.is_429 = array("b")
        self.call_end = array("d")   # every finished call: end, latency, failed
        self.call_latency = array("d")
        self.call_failed = array("b")
        self.skipped = 0


def read_series(path: str) -> Series:
    """Read the attempt rows of ``path`` (streamed; unreadable rows are skipped)."""
    series = Series()
    open_calls: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None) or []
        needed = ("timestamp", "request_id", "status_code", "outcome", "duration_s",
                  "retry_delay_s")
        missing = [name for name in needed if name not in header]
        if missing:
            raise ValueError(f"not a cometkit metrics CSV: missing columns {', '.join(missing)}")
        at = {name: header.index(name) for name in needed}
        width = len(header)
        for cells in reader:
            if len(cells) != width:
                series.skipped += 1 if cells else 0
                continue
            try:
                end = parse_timestamp(cells[at["timestamp"]])
                duration = float(cells[at["duration_s"]] or 0.0)
                delay = float(cells[at["retry_delay_s"]] or 0.0)
            except ValueError:
                series.skipped += 1
                continue
            series.start.append(end - duration)
            series.end.append(end)
            series.is_429.append(cells[at["status_code"]] == "429")
            request_id, outcome = cells[at["request_id"]], cells[at["outcome"]]
            if outcome == "retry":
                open_calls[request_id] = open_calls.get(request_id, 0.0) + duration + delay
            elif outcome in ("ok", "error"):
                series.call_end.append(end)
                series.call_latency.append(open_calls.pop(request_id, 0.0) + duration)
                series.call_failed.append(outcome == "error")
    return series


def plot_metrics(csv_path: str, png_path: str) -> None:
    """Draw the run recorded in ``csv_path`` into ``png_path``.

    :raises MissingMatplotlib: matplotlib is not installed.
    :raises ValueError: the file is not a metrics CSV, or holds no attempt.
    """
    require_matplotlib()
    import matplotlib.pyplot as plt
    import numpy as np

    series = read_series(csv_path)
    if not len(series.end):
        raise ValueError(f"{csv_path} holds no attempt to plot")
    starts = np.frombuffer(series.start, dtype=np.float64)
    ends = np.frombuffer(series.end, dtype=np.float64)
    t0 = float(starts.min())
    span = max(float(ends.max()) - t0, 1e-3)
    bin_s = max(1.0, math.ceil(span / TARGET_BINS))
    edges = np.arange(0.0, span + bin_s, bin_s)
    centres = edges[:-1] + bin_s / 2

    call_end = np.frombuffer(series.call_end, dtype=np.float64) - t0
    call_failed = np.frombuffer(series.call_failed, dtype=np.int8).astype(bool)
    latency = np.frombuffer(series.call_latency, dtype=np.float64)
    is_429 = np.frombuffer(series.is_429, dtype=np.int8).astype(bool)

    calls, _ = np.histogram(call_end, bins=edges)
    failed, _ = np.histogram(call_end[call_failed], bins=edges)
    limited, _ = np.histogram(ends[is_429] - t0, bins=edges)

    fig, (ax_rate, ax_latency, ax_flight) = plt.subplots(
        3, 1, sharex=True, figsize=(11, 9), constrained_layout=True)
    fig.suptitle(f"{csv_path}: {len(call_end)} calls ({int(call_failed.sum())} failed), "
                 f"{len(ends)} attempts ({int(is_429.sum())} answered 429)")

    ax_rate.plot(centres, calls / bin_s, label="calls/s", color="tab:blue")
    ax_rate.plot(centres, failed / bin_s, label="failed calls/s", color="tab:gray")
    ax_rate.plot(centres, limited / bin_s, label="429 answers/s", color="tab:red")
    ax_rate.set_ylabel("per second")
    ax_rate.set_title(f"throughput ({bin_s:g} s bins)", loc="left")
    ax_rate.legend(loc="upper right")
    ax_rate.grid(alpha=0.3)

    quantiles = np.full((len(centres), 3), np.nan)
    if len(call_end):
        which = np.clip(np.searchsorted(edges, call_end, side="right") - 1, 0,
                        len(centres) - 1)
        order = np.argsort(which, kind="stable")
        cuts = np.flatnonzero(np.diff(which[order])) + 1
        for index, group in zip(which[order][np.r_[0, cuts]], np.split(latency[order], cuts)):
            quantiles[index] = np.percentile(group, (50, 95, 99))
    for column, (q, colour) in enumerate(((50, "tab:green"), (95, "tab:orange"),
                                          (99, "tab:red"))):
        ax_latency.plot(centres, quantiles[:, column], label=f"p{q}", color=colour, marker=".")
    ax_latency.set_ylabel("seconds")
    ax_latency.set_title("call latency (attempts + back-off sleeps)", loc="left")
    ax_latency.legend(loc="upper right")
    ax_latency.grid(alpha=0.3)

    times = np.concatenate([starts, ends]) - t0
    steps = np.concatenate([np.ones(len(starts)), -np.ones(len(ends))])
    order = np.lexsort((steps, times))  # at equal times, ends (-1) before starts
    in_flight = np.cumsum(steps[order])
    ax_flight.step(np.concatenate([[0.0], times[order]]), np.concatenate([[0.0], in_flight]),
                   where="post", color="tab:purple")
    ax_flight.set_ylabel("attempts")
    ax_flight.set_title(f"in flight (max {int(in_flight.max())})", loc="left")
    ax_flight.set_xlabel("seconds since the first attempt began")
    ax_flight.grid(alpha=0.3)
    ax_flight.set_xlim(0, span)

    fig.savefig(png_path, dpi=100)
    plt.close(fig)
