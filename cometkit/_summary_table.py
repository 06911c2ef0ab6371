"""The text of a summary: the fixed-width table, shaped like Locust's console statistics, that
``stdout_metrics`` prints at close and ``cometkit report`` prints from a metrics CSV.

It renders the rows of :meth:`cometkit.summary.Summary.rows` (the numbers are computed there):
one column per statistic, latencies in milliseconds, shares in percent, and a cost column when
the summary has prices.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from .prices import format_usd

__all__ = ["format_table"]


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 1000.0:.0f}"


def _percent(share: Optional[float]) -> str:
    return "-" if share is None else f"{share * 100.0:.0f}"


def _usd(cost: Optional[float]) -> str:
    return "-" if cost is None else format_usd(cost, sign=False)


#: Table layout: (header, row key, width, formatter). Latencies are shown in milliseconds.
_COLUMNS = (
    ("Calls", "calls", 8, str),
    ("Fails", "failures", 7, str),
    ("429s", "status_429", 7, str),
    ("Retries", "retries", 8, str),
    ("p50 ms", "latency_p50_s", 8, _ms),
    ("p95 ms", "latency_p95_s", 8, _ms),
    ("p99 ms", "latency_p99_s", 8, _ms),
    ("Queue p50", "queue_p50_s", 10, _ms),
    ("Queue p95", "queue_p95_s", 10, _ms),
    ("Queue %", "queue_share", 8, _percent),
    ("Wire %", "wire_share", 7, _percent),
    ("Backoff %", "backoff_share", 10, _percent),
    ("Tokens in", "input_tokens", 11, str),
    ("Tokens out", "output_tokens", 11, str),
    ("Calls/s", "calls_per_s", 8, lambda v: f"{v:.2f}"),
)
#: Shown after the others when the summary has prices.
_COST_COLUMN = ("Cost $", "cost_usd", 10, _usd)
_MODEL_WIDTH_MAX = 40


def format_table(rows: list[dict[str, Any]], *, with_cost: bool) -> str:
    """``rows`` (the models', then the total row last) as a fixed-width table ending in a
    newline; ``with_cost`` adds the cost column."""
    columns = _COLUMNS + ((_COST_COLUMN,) if with_cost else ())
    # the total row is among the rows: the model column is at least as wide as its name
    model_width = min(max(len(row["model"]) for row in rows), _MODEL_WIDTH_MAX)

    def line(model: str, cells: Iterable[str]) -> str:
        if len(model) > model_width:
            model = model[: model_width - 1] + "~"
        parts = [f"{model:<{model_width}}"]
        parts += [f"{cell:>{width}}" for cell, (_, _, width, _) in zip(cells, columns)]
        return " ".join(parts).rstrip()

    rule = "-" * model_width + "".join("|" + "-" * width for _, _, width, _ in columns)
    out = [line("Model", (header for header, _, _, _ in columns)), rule]
    for row in rows[:-1]:
        out.append(line(row["model"], (fmt(row[key]) for _, key, _, fmt in columns)))
    out.append(rule)
    total = rows[-1]
    out.append(line(total["model"], (fmt(total[key]) for _, key, _, fmt in columns)))
    return "\n".join(out) + "\n"
