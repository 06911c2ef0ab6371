"""``stdout_metrics``: one line per attempt on stdout (or stderr), and a per-model table at close.

cometkit as a library never prints; this sink writes to the terminal only because the
configuration asked it to (``plugins: {stdout_metrics: ...}``, or the CLI turning it on). It
writes with ``stream.write`` under a lock shared by every sink of the process, so lines of
concurrent threads and clients never interleave, and flushes each line so that the output can
be followed live. The stream is looked up as ``sys.stdout`` / ``sys.stderr`` at every write, so
a redirected stream (``contextlib.redirect_stdout``, pytest's ``capsys``) is honoured.

Formats (``format``):

- ``text``: logfmt, ``key=value`` for every non-empty field of :data:`cometkit.ATTEMPT_FIELDS`,
  values with spaces, quotes, ``=`` or control characters quoted as JSON strings; at close the
  table of :meth:`cometkit.summary.Summary.format_table`;
- ``json``: one JSON object per attempt with every field (``null`` when missing), and at close
  one object ``{"summary": ...}`` holding :meth:`cometkit.summary.Summary.to_dict`.

Cell values are formatted as in the metrics CSV (ISO 8601 UTC timestamps, seconds with at most
6 decimals), but without the spreadsheet-formula quoting, which a terminal does not need.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from typing import Any, Optional

from cometkit import (
    ATTEMPT_FIELDS,
    AttemptRecord,
    CallRecord,
    ClientContext,
    Option,
    PluginSpec,
    hookimpl,
)
from cometkit.metrics_csv import column_formatter, format_timestamp
from cometkit.prices import PriceTable
from cometkit.summary import Summary

__all__ = ["StdoutMetricsSink", "cometkit_plugin_spec", "cometkit_make_metrics_sink"]

PLUGIN_NAME = "stdout_metrics"
FORMATS = ("text", "json")
STREAMS = ("stdout", "stderr")

# One lock for every sink of the process: two clients writing to one terminal stay readable.
_write_lock = threading.Lock()

_NEEDS_QUOTES = re.compile(r'[\s="\\]|[\x00-\x1f\x7f]')


def _logfmt_value(text: str) -> str:
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text, ensure_ascii=False)
    return text


class StdoutMetricsSink:
    """Writes attempt lines and, at :meth:`close`, the run's summary to ``sys.stdout`` or
    ``sys.stderr``.

    :param format: ``text`` (logfmt lines and a table) or ``json`` (JSON lines).
    :param summary: write the per-model summary at close (skipped when nothing was recorded).
    :param stream: ``stdout`` or ``stderr``.
    :param per_attempt: write one line per attempt.
    :param prices: what tokens cost per model, for the summary's cost column.
    :raises ValueError: an unknown format or stream.
    """

    def __init__(self, *, format: str = "text", summary: bool = True,
                 stream: str = "stdout", per_attempt: bool = True,
                 prices: Optional[PriceTable] = None) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, not {stream!r}")
        self.format = format
        self.stream = stream
        self.per_attempt = per_attempt
        #: The summary being accumulated (``None`` when ``summary`` is off).
        self.summary: Optional[Summary] = Summary(prices=prices) if summary else None
        self._recorded = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._fields = ATTEMPT_FIELDS
        if format == "text":
            self._text = tuple(column_formatter(name, _logfmt_value) for name in ATTEMPT_FIELDS)

    def _write(self, text: str) -> None:
        with _write_lock:
            out = getattr(sys, self.stream)
            out.write(text)
            out.flush()

    def _line(self, record: AttemptRecord) -> str:
        values = [getattr(record, name) for name in self._fields]
        if self.format == "json":
            obj: dict[str, Any] = {}
            for name, value in zip(self._fields, values):
                if name == "timestamp" and value is not None:
                    value = format_timestamp(value)
                elif isinstance(value, float):
                    value = round(value, 6)
                obj[name] = value
            return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
        return " ".join(
            f"{name}={fmt(value)}"
            for name, fmt, value in zip(self._fields, self._text, values)
            if value is not None and value != ""
        ) + "\n"

    def record_attempt(self, record: AttemptRecord) -> None:
        self._recorded = True
        if self.summary is not None:
            self.summary.add_attempt(record)
        if self.per_attempt:
            self._write(self._line(record))

    def record_call(self, record: CallRecord) -> None:
        """Nothing: the summary is derived from attempts, exactly as ``cometkit report``
        derives it from the CSV, so both show the same numbers."""

    def flush(self) -> None:
        with _write_lock:
            getattr(sys, self.stream).flush()

    def close(self) -> None:
        """Write the summary (once)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self.summary is None or not self._recorded:
            return
        if self.format == "json":
            self._write(json.dumps({"summary": self.summary.to_dict()}, ensure_ascii=False,
                                   separators=(",", ":")) + "\n")
        else:
            self._write(self.summary.format_table())

    def __repr__(self) -> str:
        return f"StdoutMetricsSink(format={self.format!r}, stream={self.stream!r})"


@hookimpl
def cometkit_plugin_spec() -> PluginSpec:
    return PluginSpec(
        summary="Print one line per attempt and a per-model summary table at close.",
        enabled_by_default=False,
        options={
            "format": Option("str", default="text", choices=FORMATS,
                             help="`text` (key=value lines and a table) or `json` (JSON lines)."),
            "summary": Option("bool", default=True,
                              help="Write the per-model summary when the client closes."),
            "stream": Option("str", default="stdout", choices=STREAMS,
                             help="Where to write: `stdout` or `stderr`."),
            "per_attempt": Option("bool", default=True,
                                  help="Write one line per attempt."),
        },
    )


@hookimpl
def cometkit_make_metrics_sink(ctx: ClientContext) -> Optional[StdoutMetricsSink]:
    return StdoutMetricsSink(**ctx.options(), prices=ctx.prices)
