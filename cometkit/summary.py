"""Per-model statistics of attempt records, and the metrics-CSV cell format they are read from.

One :class:`Summary` serves both places a run is summed up: the ``stdout_metrics`` sink feeds
it live and prints its table at close, and ``cometkit report`` feeds it from a metrics CSV with
:meth:`Summary.from_csv`. Both see the same attempt rows, so both print the same numbers.

Everything is derived from attempt records alone (the CSV holds nothing else):

- a *call* is one ``request_id``; it is counted when its final attempt arrives, i.e. an attempt
  whose ``outcome`` is ``ok`` or ``error`` (an attempt with outcome ``retry`` is never final).
  Calls cut short by a killed process (only ``retry`` rows) are therefore not counted;
- *failures* are calls whose final outcome is ``error``;
- *429s* are attempts answered with status 429; *retries* are attempts with outcome ``retry``;
- *latency* is per call: where its time went, added up -- *queue* (its attempts'
  ``queue_s``: waiting for admission in the client's limiter, a 429'd call requeued there
  included), *wire* (its attempts' ``duration_s``) and *back-off* (the retry policy's sleeps
  between them, ``retry_delay_s``). That is what the caller waited, short only of the
  microseconds the client spends on its own bookkeeping (which the ``duration_s`` of a call
  record, written with ``csv_metrics.calls_path``, includes). The table shows queue p50 / p95
  per call and each part's share of all calls' time. A CSV written before ``queue_s`` existed
  has no queue time: there it reads as 0;
- *tokens* are summed over all attempts; their *cost* is the model's price (the
  configuration's ``prices:``, :class:`~cometkit.prices.PriceTable`) times those sums, shown
  only where the price is known (the total only when every model's is);
- *calls/s* is calls divided by the observed span: from the earliest attempt start
  (``timestamp - duration_s``; the timestamp is taken when an attempt ends) to the latest
  attempt end. Timestamps are taken to the millisecond, as the CSV stores them.

Memory stays bounded whatever the number of rows: latencies go into a log-bucket sketch
(:class:`LatencySketch`, relative error at most 1 %), and only calls still waiting for their
final attempt are remembered (:class:`OpenCalls`, at most :data:`MAX_OPEN_CALLS`). Times are
summed in whole microseconds, as the CSV holds them, so the sums do not depend on the order in
which threads delivered the rows.

The CSV format itself -- how the ``csv_metrics`` plugin writes cells and how they are read back
-- is :mod:`cometkit.metrics_csv`. This module holds the aggregation; the sketch, the folding of
attempts into calls and the text table are their own modules (:mod:`cometkit._latency_sketch`,
:mod:`cometkit._open_calls`, :mod:`cometkit._summary_table`), their public names exported here.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable, Iterable, Optional, Union

from ._latency_sketch import LatencySketch
from ._open_calls import MAX_OPEN_CALLS, CallSplit, OpenCalls
from ._summary_table import format_table
from .metrics_csv import read_attempts
from .plugin_api import AttemptRecord
from .prices import PriceTable

__all__ = [
    "Summary",
    "LatencySketch",
    "CallSplit",
    "OpenCalls",
    "AGGREGATED",
    "MAX_OPEN_CALLS",
]

logger = logging.getLogger("cometkit.summary")

#: Name of the total row in :meth:`Summary.rows` and the table.
AGGREGATED = "Aggregated"
#: Shown in place of a missing model name (e.g. ``GET /models``).
NO_MODEL = "(no model)"


class _Stats:
    """Counters of one model (or of the total row)."""

    __slots__ = ("attempts", "calls", "failures", "status_429", "retries", "input_tokens",
                 "output_tokens", "first_start", "last_end", "latency", "queue", "queue_us",
                 "wire_us", "backoff_us")

    def __init__(self) -> None:
        self.attempts = 0
        self.calls = 0
        self.failures = 0
        self.status_429 = 0
        self.retries = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.first_start = math.inf
        self.last_end = -math.inf
        self.latency = LatencySketch()
        self.queue = LatencySketch()
        # finished calls' time by part, whole microseconds (exact, whatever the order)
        self.queue_us = 0
        self.wire_us = 0
        self.backoff_us = 0

    def add_call(self, split: CallSplit, failed: bool) -> None:
        self.calls += 1
        if failed:
            self.failures += 1
        self.latency.add(split.total_us / 1e6)
        self.queue.add(split.queue_us / 1e6)
        self.queue_us += split.queue_us
        self.wire_us += split.wire_us
        self.backoff_us += split.backoff_us

    def as_row(self, model: str) -> dict[str, Any]:
        # rounded to the microsecond: the CSV round trip must not move the last digit
        span_s = round(max(0.0, self.last_end - self.first_start), 6) if self.attempts else 0.0
        sketch = self.latency
        total_us = self.queue_us + self.wire_us + self.backoff_us
        return {
            "model": model,
            "calls": self.calls,
            "failures": self.failures,
            "status_429": self.status_429,
            "retries": self.retries,
            "attempts": self.attempts,
            "latency_p50_s": sketch.quantile(0.50),
            "latency_p95_s": sketch.quantile(0.95),
            "latency_p99_s": sketch.quantile(0.99),
            "latency_max_s": sketch.max_s if sketch.count else None,
            "queue_p50_s": self.queue.quantile(0.50),
            "queue_p95_s": self.queue.quantile(0.95),
            "queue_s": self.queue_us / 1e6,
            "wire_s": self.wire_us / 1e6,
            "backoff_s": self.backoff_us / 1e6,
            "queue_share": self.queue_us / total_us if total_us else None,
            "wire_share": self.wire_us / total_us if total_us else None,
            "backoff_share": self.backoff_us / total_us if total_us else None,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "span_s": span_s,
            "calls_per_s": self.calls / span_s if span_s > 0 else 0.0,
        }




class Summary:
    """Accumulates attempt records and sums them up per model (see the module docstring for how
    each number is computed). Thread-safe: one lock around each record."""

    def __init__(self, *, prices: Optional[PriceTable] = None) -> None:
        self._lock = threading.Lock()
        #: What tokens cost per model; empty: no cost column.
        self.prices = prices if prices is not None else PriceTable()
        self._models: dict[str, _Stats] = {}
        self._total = _Stats()
        self._open = OpenCalls()
        #: Rows :meth:`from_csv` could not read (wrong column count, bad numbers).
        self.skipped_rows = 0

    def add_attempt(self, record: Any) -> None:
        """Count one attempt: an :class:`cometkit.AttemptRecord` or any object with its fields
        (``timestamp``, ``request_id``, ``model``, ``status_code``, ``outcome``,
        ``duration_s``, ``queue_s``, ``retry_delay_s``, ``input_tokens``,
        ``output_tokens``)."""
        model = record.model or NO_MODEL
        # rounded as the CSV holds them (ms timestamps, µs durations), so a live summary and
        # one read back from the CSV agree to the last digit
        split = OpenCalls.split_of(record)
        end = round(float(record.timestamp), 3)
        start = end - split.wire_us / 1e6
        outcome = record.outcome
        with self._lock:
            stats = self._models.get(model)
            if stats is None:
                stats = self._models[model] = _Stats()
            call = self._open.add(record, split)
            for target in (stats, self._total):
                target.attempts += 1
                if record.status_code == 429:
                    target.status_429 += 1
                if outcome == "retry":
                    target.retries += 1
                elif call is not None:
                    target.add_call(call, outcome == "error")
                target.input_tokens += record.input_tokens or 0
                target.output_tokens += record.output_tokens or 0
                if start < target.first_start:
                    target.first_start = start
                if end > target.last_end:
                    target.last_end = end

    def add_attempts(self, records: Iterable[Any]) -> None:
        """:meth:`add_attempt` for each record."""
        for record in records:
            self.add_attempt(record)

    @classmethod
    def from_csv(cls, path: Union[str, Any], *, encoding: str = "utf-8",
                 prices: Optional[PriceTable] = None,
                 also: Optional[Callable[[AttemptRecord], None]] = None) -> Summary:
        """Read a metrics CSV written by the ``csv_metrics`` plugin (any version), streaming it
        row by row with :func:`~cometkit.metrics_csv.read_attempts`.

        Rows that cannot be read (a line cut short by a crash, a bad number) are skipped with a
        warning and counted in :attr:`skipped_rows`; a header that lacks a column this summary
        needs raises ``ValueError``.

        :param also: called with every record as well (``cometkit report --plot`` fills its
            plot from the same read).
        """
        summary = cls(prices=prices)

        def skipped(line_number: int, reason: str) -> None:
            summary.skipped_rows += 1
            logger.warning("%s: line %d skipped: %s", path, line_number, reason)

        for record in read_attempts(path, encoding=encoding, on_skip=skipped):
            summary.add_attempt(record)
            if also is not None:
                also(record)
        return summary

    def rows(self) -> list[dict[str, Any]]:
        """One dict per model, sorted by model name, then the ``Aggregated`` total row.

        Keys: ``model, calls, failures, status_429, retries, attempts, latency_p50_s,
        latency_p95_s, latency_p99_s, latency_max_s, queue_p50_s, queue_p95_s`` (seconds per
        call, ``None`` without calls), ``queue_s, wire_s, backoff_s`` (the finished calls'
        time by part, seconds), ``queue_share, wire_share, backoff_share`` (each part's share
        of their sum, ``None`` when it is 0), ``input_tokens, output_tokens, span_s,
        calls_per_s``, and ``cost_usd`` (US dollars at :attr:`prices`; ``None`` for a model
        without a price, and in the total unless every model with tokens has one).
        """
        with self._lock:
            out = [self._models[name].as_row(name) for name in sorted(self._models)]
            total = self._total.as_row(AGGREGATED)
        costs = []
        for row in out:
            row["cost_usd"] = self.prices.cost_usd(None if row["model"] == NO_MODEL
                                                   else row["model"],
                                                   row["input_tokens"], row["output_tokens"])
            if row["cost_usd"] is not None or row["input_tokens"] or row["output_tokens"]:
                costs.append(row["cost_usd"])
        known = bool(self.prices) and None not in costs
        total["cost_usd"] = sum(costs) if known else None
        out.append(total)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"models": [...], "total": {...}, "latency": {...}}``."""
        rows = self.rows()
        return {
            "models": rows[:-1],
            "total": rows[-1],
            "latency": {"per": "call", "relative_accuracy": LatencySketch.RELATIVE_ACCURACY},
            "skipped_rows": self.skipped_rows,
        }

    def format_table(self) -> str:
        """A fixed-width table shaped like Locust's console statistics, ending in a newline."""
        return format_table(self.rows(), with_cost=bool(self.prices))
