"""``csv_metrics``: one CSV row per attempt (and optionally one per call), safe to open in a
spreadsheet and cheap enough to leave on.

The columns are :data:`cometkit.ATTEMPT_FIELDS` in order (documented in ``docs/metrics.md``).
Cell formats come from :mod:`cometkit.summary`, which also reads them back for
``cometkit report``:

- ``timestamp``: ISO 8601 UTC with milliseconds (``2024-05-01T12:00:00.123Z``), when the attempt
  ended;
- seconds with at most 6 decimals, integers as integers, missing values as empty cells;
- text cells starting with ``= + - @``, tab or CR get a leading ``'`` (OWASP CSV injection);
  numeric cells are written from numbers, so ``-1`` stays ``-1``.

Files are opened in append mode. A new or empty file gets the header; an existing file whose
first line is the same header is appended to; an existing file with any other first line is
refused with a :class:`cometkit.ConfigError` rather than mixed with foreign rows or overwritten
(choose another path or move the old file). New columns are only ever added at the end, so the
header of a file written by an older cometkit is a prefix of today's: the error then says so
(``cometkit report`` still reads such a file). If the file ends in a line cut short by a crash, a
newline is added first, so the cut line stays one malformed row (``cometkit report`` skips it)
instead of swallowing the next one.

Every row is written with a single ``write`` and flushed under one lock, so rows never
interleave and a crash loses at most the row being written; the file is fsynced at close.
All sinks of a process that write to the same file share one handle and one lock. Records
never hold the API key, prompts or completions, so neither does the file.
"""

from __future__ import annotations

import csv
import logging
import operator
import os
import threading
from typing import Any, Callable, Optional, Sequence

from cometkit import (
    ATTEMPT_FIELDS,
    CALL_FIELDS,
    AttemptRecord,
    CallRecord,
    ClientContext,
    ConfigError,
    Option,
    PluginSpec,
    hookimpl,
)
from cometkit.metrics_csv import column_formatter

__all__ = ["CsvMetricsSink", "cometkit_plugin_spec", "cometkit_make_metrics_sink"]

logger = logging.getLogger("cometkit.plugins.csv_metrics")

PLUGIN_NAME = "csv_metrics"


def _row_formatter(fields: Sequence[str]) -> Callable[[Any], list[str]]:
    """Turn a record into CSV cells, with every column's formatter resolved once."""
    getter = operator.attrgetter(*fields)
    formatters = tuple(column_formatter(name) for name in fields)

    def cells(record: Any) -> list[str]:
        return ["" if value is None else fmt(value)
                for fmt, value in zip(formatters, getter(record))]

    return cells


class _CsvFile:
    """One open CSV file, shared by every sink of the process that writes to it."""

    def __init__(self, path: str, fields: Sequence[str], option_key: str) -> None:
        self.path = path
        self.fields = tuple(fields)
        self.users = 0
        self._lock = threading.Lock()
        self._cells = _row_formatter(self.fields)
        header = ",".join(self.fields)
        try:
            needs_header, needs_newline, first = self._inspect(header)
            self._handle = open(path, "a", newline="", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"plugins.{PLUGIN_NAME}.{option_key}: cannot write {path!r}: "
                              f"{exc.strerror or exc}", key=f"plugins.{PLUGIN_NAME}.{option_key}"
                              ) from exc
        if needs_header is None:
            self._handle.close()
            older = first and header.startswith(first + ",")
            raise ConfigError(
                f"plugins.{PLUGIN_NAME}.{option_key}: {path!r} already exists and its first "
                f"line is not the expected header ({header}); "
                + (f"it was written by an older cometkit, without the columns "
                   f"{header[len(first) + 1:]} (cometkit report still reads it)"
                   if older else "it was not written by this version of csv_metrics")
                + ". Choose another path or move the file away.",
                key=f"plugins.{PLUGIN_NAME}.{option_key}")
        self._writer = csv.writer(self._handle, lineterminator="\n")
        if needs_newline:
            self._handle.write("\n")
        if needs_header:
            self._writer.writerow(self.fields)
        self._handle.flush()

    def _inspect(self, header: str) -> tuple[Optional[bool], bool, str]:
        """(needs a header — ``None`` when the file holds another header, ends mid-line, its
        first line as far as it could be the header)."""
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            return True, False, ""
        if size == 0:
            return True, False, ""
        with open(self.path, "rb") as existing:
            first = existing.readline(len(header) + 3).rstrip(b"\r\n")
            existing.seek(-1, os.SEEK_END)
            ends_mid_line = existing.read(1) != b"\n"
        if first != header.encode("ascii"):
            return None, False, first.decode("ascii", "replace")
        return False, ends_mid_line, header

    def write(self, record: Any) -> None:
        cells = self._cells(record)
        with self._lock:
            self._writer.writerow(cells)
            self._handle.flush()

    def flush(self) -> None:
        with self._lock:
            self._handle.flush()

    def close(self) -> None:
        with self._lock:
            if self._handle.closed:
                return
            self._handle.flush()
            try:
                os.fsync(self._handle.fileno())
            except OSError:  # pragma: no cover - e.g. a pipe or a file system without fsync
                logger.debug("fsync of %s failed", self.path, exc_info=True)
            self._handle.close()


_files_lock = threading.Lock()
_files: dict[str, _CsvFile] = {}


def _open_shared(path: str, fields: Sequence[str], option_key: str) -> _CsvFile:
    key = os.path.realpath(path)
    with _files_lock:
        shared = _files.get(key)
        if shared is None:
            shared = _files[key] = _CsvFile(key, fields, option_key)
        elif shared.fields != tuple(fields):
            raise ConfigError(
                f"plugins.{PLUGIN_NAME}.{option_key}: {path!r} is already open for records "
                f"with other columns (path and calls_path must differ)",
                key=f"plugins.{PLUGIN_NAME}.{option_key}")
        shared.users += 1
        return shared


def _close_shared(shared: _CsvFile) -> None:
    with _files_lock:
        shared.users -= 1
        if shared.users > 0:
            shared.flush()
            return
        _files.pop(shared.path, None)
    shared.close()


class CsvMetricsSink:
    """Writes :class:`cometkit.AttemptRecord` rows to ``path`` and, when ``calls_path`` is set,
    :class:`cometkit.CallRecord` rows (columns :data:`cometkit.CALL_FIELDS`) to ``calls_path``.

    Thread-safe. Opens (and checks) the files at once, so a bad path fails when the client is
    built, not at the first call.

    :raises ConfigError: a file cannot be opened for appending, or it already holds another
        header.
    """

    def __init__(self, path: str, *, calls_path: Optional[str] = None) -> None:
        self.path = os.path.expanduser(os.fspath(path))
        self.calls_path = os.path.expanduser(os.fspath(calls_path)) if calls_path else None
        self._closed = False
        self._attempts = _open_shared(self.path, ATTEMPT_FIELDS, "path")
        self._calls: Optional[_CsvFile] = None
        if self.calls_path is not None:
            try:
                self._calls = _open_shared(self.calls_path, CALL_FIELDS, "calls_path")
            except BaseException:
                _close_shared(self._attempts)
                raise

    def record_attempt(self, record: AttemptRecord) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        self._attempts.write(record)

    def record_call(self, record: CallRecord) -> None:
        if self._calls is None:
            return
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        self._calls.write(record)

    def flush(self) -> None:
        if self._closed:
            return
        self._attempts.flush()
        if self._calls is not None:
            self._calls.flush()

    def close(self) -> None:
        """Flush, fsync and close (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        _close_shared(self._attempts)
        if self._calls is not None:
            _close_shared(self._calls)

    def __repr__(self) -> str:
        calls = f", calls_path={self.calls_path!r}" if self.calls_path else ""
        return f"CsvMetricsSink(path={self.path!r}{calls})"


@hookimpl
def cometkit_plugin_spec() -> PluginSpec:
    return PluginSpec(
        summary="Write one CSV row per attempt (and optionally per call) for spreadsheets and "
                "`cometkit report`.",
        enabled_by_default=False,
        options={
            "path": Option(
                "str", default="cometkit-metrics.csv",
                help="CSV file of attempt records (columns in docs/metrics.md); appended to, "
                     "relative to the current directory.",
                example="metrics.csv"),
            "calls_path": Option(
                "str", default=None, nullable=True,
                help="Optional second CSV file with one row per finished call.",
                example="calls.csv"),
        },
    )


@hookimpl
def cometkit_make_metrics_sink(ctx: ClientContext) -> Optional[CsvMetricsSink]:
    options = ctx.options()
    return CsvMetricsSink(options["path"], calls_path=options.get("calls_path"))
