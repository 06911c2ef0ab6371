"""``cometkit report --plot``: one PNG of a run, from its metrics CSV.

Four panels over the run's time, sharing the x axis (seconds since the first attempt began):

1. throughput: finished calls per second, failed calls per second, and 429 answers per second;
2. call latency: p50 / p95 / p99 of the calls that finished in each time bin (a call's latency
   is where its time went, added up, as in the summary table: waiting for admission, its
   attempts, and the back-off sleeps between them);
3. where the time went: the mean seconds per call spent queued for admission, on the wire and
   in back-off, stacked, with the p95 of the queue time;
4. concurrency: attempts in flight, from each attempt's start (``timestamp - duration_s``, the
   CSV timestamp being the attempt's end) to its end.

Rows are read by :func:`cometkit.metrics_csv.read_attempts` (once, for the table and the plot
together) and folded into calls by :class:`cometkit.summary.OpenCalls`, exactly as for the
table, so a CSV written before
``queue_s`` existed plots too (with no queue time). matplotlib is an optional dependency
(``pip install 'cometkit[plot]'``).
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from .metrics_csv import read_attempts
from .plugin_api import AttemptRecord
from .summary import OpenCalls

__all__ = ["MissingMatplotlib", "require_matplotlib", "plot_metrics", "read_series", "Series"]

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
    """The columns of a metrics CSV that the plot needs, in compact arrays: fed one attempt
    record at a time (:meth:`add`), as ``cometkit report`` reads the file once for its table
    and its plot."""

    def __init__(self) -> None:
        self.start = array("d")      # every attempt: start and end, epoch seconds
        self.end = array("d")
        self.is_429 = array("b")
        self.call_end = array("d")   # every finished call: end, latency, failed, its parts
        self.call_latency = array("d")
        self.call_failed = array("b")
        self.call_queue = array("d")
        self.call_wire = array("d")
        self.call_backoff = array("d")
        self.skipped = 0
        self._calls = OpenCalls()

    def add(self, record: AttemptRecord) -> None:
        """One attempt row (and the call it ends, if it is the call's last)."""
        calls = self._calls
        split = calls.split_of(record)
        end = record.timestamp
        self.start.append(end - split.wire_us / 1e6)
        self.end.append(end)
        self.is_429.append(record.status_code == 429)
        call = calls.add(record, split)
        if call is not None:
            self.call_end.append(end)
            self.call_latency.append(call.total_us / 1e6)
            self.call_failed.append(record.outcome == "error")
            self.call_queue.append(call.queue_us / 1e6)
            self.call_wire.append(call.wire_us / 1e6)
            self.call_backoff.append(call.backoff_us / 1e6)


def read_series(path: str) -> Series:
    """Read the attempt rows of ``path`` (streamed; unreadable rows are skipped).

    :raises ValueError: the file is not a metrics CSV (see :func:`read_attempts`).
    """
    series = Series()

    def skipped(_line: int, _reason: str) -> None:
        series.skipped += 1

    for record in read_attempts(path, on_skip=skipped):
        series.add(record)
    return series


def plot_metrics(series: Series, png_path: str, *, source: str = "the metrics CSV") -> None:
    """Draw the run in ``series`` (:func:`read_series`, or fed row by row) into ``png_path``.

    :raises MissingMatplotlib: matplotlib is not installed.
    :raises ValueError: ``series`` holds no attempt (``source`` names where it came from).
    """
    require_matplotlib()
    import matplotlib.pyplot as plt
    import numpy as np

    if not len(series.end):
        raise ValueError(f"{source} holds no attempt to plot")
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

    fig, (ax_rate, ax_latency, ax_split, ax_flight) = plt.subplots(
        4, 1, sharex=True, figsize=(11, 12), constrained_layout=True)
    fig.suptitle(f"{source}: {len(call_end)} calls ({int(call_failed.sum())} failed), "
                 f"{len(ends)} attempts ({int(is_429.sum())} answered 429)")

    ax_rate.plot(centres, calls / bin_s, label="calls/s", color="tab:blue")
    ax_rate.plot(centres, failed / bin_s, label="failed calls/s", color="tab:gray")
    ax_rate.plot(centres, limited / bin_s, label="429 answers/s", color="tab:red")
    ax_rate.set_ylabel("per second")
    ax_rate.set_title(f"throughput ({bin_s:g} s bins)", loc="left")
    ax_rate.legend(loc="upper right")
    ax_rate.grid(alpha=0.3)

    # the calls that finished in each bin, as (bin index, positions in the call arrays)
    which = np.clip(np.searchsorted(edges, call_end, side="right") - 1, 0, len(centres) - 1)
    order = np.argsort(which, kind="stable")
    cuts = np.flatnonzero(np.diff(which[order])) + 1
    groups = list(zip(which[order][np.r_[0, cuts]], np.split(order, cuts))) \
        if len(call_end) else []

    def per_bin(values: Any, reduce: Any, width: int) -> Any:
        """``reduce`` of ``values`` over the calls of each bin (NaN where none finished)."""
        out = np.full((len(centres), width), np.nan)
        for index, members in groups:
            out[index] = reduce(values[members])
        return out

    quantiles = per_bin(latency, lambda group: np.percentile(group, (50, 95, 99)), 3)
    for column, (q, colour) in enumerate(((50, "tab:green"), (95, "tab:orange"),
                                          (99, "tab:red"))):
        ax_latency.plot(centres, quantiles[:, column], label=f"p{q}", color=colour, marker=".")
    ax_latency.set_ylabel("seconds")
    ax_latency.set_title("call latency (queue + attempts + back-off sleeps)", loc="left")
    ax_latency.legend(loc="upper right")
    ax_latency.grid(alpha=0.3)

    queue = np.frombuffer(series.call_queue, dtype=np.float64)
    parts = [(queue, "queue (waiting for admission)", "tab:olive"),
             (np.frombuffer(series.call_wire, dtype=np.float64), "wire (attempts)", "tab:blue"),
             (np.frombuffer(series.call_backoff, dtype=np.float64), "back-off sleeps",
              "tab:gray")]
    means = [np.nan_to_num(per_bin(values, np.mean, 1)[:, 0]) for values, _, _ in parts]
    ax_split.stackplot(centres, *means, labels=[label for _, label, _ in parts],
                       colors=[colour for _, _, colour in parts], alpha=0.7)
    ax_split.plot(centres, per_bin(queue, lambda group: np.percentile(group, 95), 1)[:, 0],
                  label="queue p95", color="black", linestyle="--", marker=".")
    ax_split.set_ylabel("seconds per call")
    ax_split.set_title("where the time went (mean per call, stacked)", loc="left")
    ax_split.legend(loc="upper right")
    ax_split.grid(alpha=0.3)

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
