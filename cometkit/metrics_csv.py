"""The metrics CSV: how the ``csv_metrics`` plugin writes its cells, and how they are read back.

One format, in one place: :func:`column_formatter` turns a record's fields into cells as the
sink writes them (timestamps to the millisecond, seconds to the microsecond, text neutralised
against spreadsheet formulas), and :func:`read_attempts` streams a file back into
:class:`~cometkit.AttemptRecord` values -- for ``cometkit report``, its table and its plot
alike, from one read of the file. Files of any earlier version read back: columns added later
(:data:`LATER_COLUMNS`) may be missing.
"""

from __future__ import annotations

import csv
import datetime as _dt
import time as _time
from typing import Any, Callable, Iterator, Optional, Union

from .plugin_api import ATTEMPT_FIELDS, AttemptRecord

__all__ = [
    "read_attempts",
    "format_timestamp",
    "parse_timestamp",
    "format_seconds",
    "neutralize_cell",
    "restore_cell",
    "column_formatter",
    "INT_COLUMNS",
    "SECONDS_COLUMNS",
    "LATER_COLUMNS",
]


# -------------------------------------------------------------------------------------------
# Cell format
# -------------------------------------------------------------------------------------------

#: First characters that make a spreadsheet treat a cell as a formula (OWASP "CSV Injection"),
#: plus their full-width forms, which some spreadsheets also honour, and the quote itself so
#: that :func:`restore_cell` is an exact inverse.
_FORMULA_STARTS = frozenset("=+-@\t\r\uff1d\uff0b\uff0d\uff20'")

_second_cache: tuple[int, str] = (-1, "")


def format_timestamp(epoch_s: float) -> str:
    """ISO 8601 UTC rounded to the millisecond, e.g. ``2024-05-01T12:00:00.123Z``.

    Readable in a spreadsheet, sortable as text, and unambiguous about the time zone. The
    date part is cached per second, so formatting costs about a microsecond per row.
    """
    global _second_cache
    second, millis = divmod(round(epoch_s * 1000.0), 1000)
    cached_second, prefix = _second_cache
    if cached_second != second:
        prefix = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(second))
        _second_cache = (second, prefix)
    return f"{prefix}.{millis:03d}Z"


def parse_timestamp(text: str) -> float:
    """Epoch seconds from :func:`format_timestamp`'s output (any ISO 8601 form with a time zone,
    a naive one read as UTC, or plain epoch seconds).

    :raises ValueError: when ``text`` is neither.
    """
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = _dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def format_seconds(value: float) -> str:
    """A duration with at most 6 decimals (microseconds), trailing zeros dropped: ``1.5``."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def neutralize_cell(text: str) -> str:
    """Defuse a text cell a spreadsheet could run as a formula (OWASP CSV injection).

    A cell starting with ``= + - @``, tab or carriage return (or a full-width ``= + - @``) gets a
    leading single quote, which spreadsheets show as text. A cell that already starts with a
    quote gets one more, so :func:`restore_cell` gives back exactly the original. Only text
    columns go through this: numeric columns are written from numbers and cannot hold a formula.
    """
    if text and text[0] in _FORMULA_STARTS:
        return "'" + text
    return text


def restore_cell(text: str) -> str:
    """Inverse of :func:`neutralize_cell`."""
    if text.startswith("'"):
        return text[1:]
    return text


#: Integer columns of attempt and call records.
INT_COLUMNS = frozenset({"attempt", "attempts", "status_code", "input_tokens", "output_tokens"})
#: Columns holding seconds, written by :func:`format_seconds`.
SECONDS_COLUMNS = frozenset({"duration_s", "ttfc_s", "retry_delay_s", "queue_s", "wire_s",
                             "backoff_s"})
#: Attempt columns added after the first release. A CSV written before one existed lacks it;
#: :func:`read_attempts` reads it there as "not known" (``None``) instead of refusing the file.
LATER_COLUMNS = frozenset({"queue_s"})


def _format_int(value: Any) -> str:
    return str(int(value))


def column_formatter(name: str, text: Callable[[str], str] = neutralize_cell
                     ) -> Callable[[Any], str]:
    """How a value of column ``name`` is written (``None`` is the caller's business).

    ``timestamp`` by :func:`format_timestamp`, :data:`INT_COLUMNS` as integers,
    :data:`SECONDS_COLUMNS` by :func:`format_seconds` (numbers are converted first, so a numeric
    column can never carry text), anything else as ``text(str(value))``. Resolve the formatters
    once per sink, not per row.
    """
    if name == "timestamp":
        return format_timestamp
    if name in INT_COLUMNS:
        return _format_int
    if name in SECONDS_COLUMNS:
        return format_seconds
    return lambda value: text(str(value))


# -------------------------------------------------------------------------------------------
# Reading a metrics CSV
# -------------------------------------------------------------------------------------------


def read_attempts(path: Union[str, Any], *, encoding: str = "utf-8",
                  on_skip: Optional[Callable[[int, str], None]] = None
                  ) -> Iterator[AttemptRecord]:
    """The attempt records of a metrics CSV written by the ``csv_metrics`` plugin, streamed.

    Columns are found by name, so the order does not matter; a column of
    :data:`LATER_COLUMNS` that the file lacks (it was written by an older version) reads as
    ``None``. A row that cannot be read (a line cut short by a crash, a bad number) is left out
    and handed to ``on_skip(line_number, reason)``.

    :raises ValueError: the header lacks a column, the file is not ``encoding`` text, or a
        quoted cell is never closed (each naming the file, and the line where it helps).
    """
    with open(path, newline="", encoding=encoding) as handle:
        reader = csv.reader(handle)
        try:
            yield from _attempt_rows(reader, path, on_skip)
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{reader.line_num + 1}: not {encoding} text, so not a "
                             "cometkit metrics CSV") from None


def _attempt_rows(reader: Any, path: Any, on_skip: Optional[Callable[[int, str], None]]
                  ) -> Iterator[AttemptRecord]:
    header = _next_row(reader, path)
    if header is None:
        return
    missing = [name for name in ATTEMPT_FIELDS if name not in header
               and name not in LATER_COLUMNS]
    if missing:
        raise ValueError(f"{path}: not a cometkit metrics CSV: missing columns "
                         f"{', '.join(missing)}")
    width = len(header)
    positions = [header.index(name) if name in header else None for name in ATTEMPT_FIELDS]
    while True:
        line_number = reader.line_num + 1
        cells = _next_row(reader, path)
        if cells is None:
            return
        if not cells:
            continue
        try:
            if len(cells) != width:
                raise ValueError(f"{len(cells)} cells instead of {width}")
            record = _record_from_cells(["" if i is None else cells[i] for i in positions])
        except ValueError as exc:
            if on_skip is not None:
                on_skip(line_number, str(exc))
            continue
        yield record


def _next_row(reader: Any, path: Any) -> Optional[list[str]]:
    """The next row, ``None`` at the end; a row the csv module cannot read is a ``ValueError``
    naming the line it starts on (the module gives up for good there: a quoted cell that is
    never closed swallows the rest of the file)."""
    started = reader.line_num + 1
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        raise ValueError(f"{path}:{started}: unreadable CSV ({exc}): a quoted cell that starts "
                         "on this line is never closed, so the file was cut short or edited; "
                         "repair or delete that line") from None


def _record_from_cells(cells: list[str]) -> AttemptRecord:
    """An :class:`AttemptRecord` from CSV cells in :data:`ATTEMPT_FIELDS` order."""
    values: list[Any] = []
    for name, cell in zip(ATTEMPT_FIELDS, cells):
        if name == "timestamp":
            values.append(parse_timestamp(cell))
        elif cell == "":
            values.append(None)
        elif name in INT_COLUMNS:
            values.append(int(cell))
        elif name in SECONDS_COLUMNS:
            values.append(float(cell))
        else:
            values.append(restore_cell(cell))
    record = AttemptRecord(**dict(zip(ATTEMPT_FIELDS, values)))
    if record.duration_s is None:
        record.duration_s = 0.0
    return record
