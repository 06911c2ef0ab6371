"""cometkit.summary: per-model statistics and the metrics-CSV cell format."""

from __future__ import annotations

import csv
import json
import random
import threading

import pytest

import cometkit._open_calls as open_calls_module
from cometkit import ATTEMPT_FIELDS, AttemptRecord
from cometkit._plot import read_series
from cometkit.metrics_csv import (
    column_formatter,
    format_seconds,
    format_timestamp,
    neutralize_cell,
    parse_timestamp,
    read_attempts,
    restore_cell,
)
from cometkit.prices import ModelPrice, PriceTable
from cometkit.summary import AGGREGATED, LatencySketch, OpenCalls, Summary


def attempt(**fields) -> AttemptRecord:
    """An attempt record with harmless defaults for whatever the test does not care about."""
    values = dict(
        timestamp=1_714_564_800.0, request_id="ck-1", attempt=1, operation="chat",
        method="POST", route="/chat/completions", server_address="127.0.0.1", model="m1",
        response_model=None, status_code=200, error_type=None, outcome="ok", duration_s=0.1,
        ttfc_s=None, retry_delay_s=None, input_tokens=None, output_tokens=None,
        provider_request_id=None,
    )
    values.update(fields)
    return AttemptRecord(**values)


def by_model(summary: Summary) -> dict:
    return {row["model"]: row for row in summary.rows()}


# -------------------------------------------------------------------------------------------
# Cell format
# -------------------------------------------------------------------------------------------


def test_timestamp_is_iso_utc_with_milliseconds_and_parses_back():
    assert format_timestamp(1_714_564_800.1234) == "2024-05-01T12:00:00.123Z"
    assert format_timestamp(1_714_564_800.9999) == "2024-05-01T12:00:01.000Z"
    assert format_timestamp(1_714_564_802.771) == "2024-05-01T12:00:02.771Z"
    assert format_timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    for epoch in (0.0, 1_714_564_800.25, 1_714_564_801.5, 2_000_000_000.007):
        assert parse_timestamp(format_timestamp(epoch)) == pytest.approx(epoch, abs=5e-4)
    assert parse_timestamp("2024-05-01T12:00:00+00:00") == 1_714_564_800.0
    assert parse_timestamp("2024-05-01T14:00:00+02:00") == 1_714_564_800.0
    assert parse_timestamp("1714564800.5") == 1_714_564_800.5
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


def test_seconds_are_compact():
    assert format_seconds(1.5) == "1.5"
    assert format_seconds(2.0) == "2"
    assert format_seconds(0.0000004) == "0"
    assert format_seconds(-0.0) == "0"
    assert format_seconds(0.1234567) == "0.123457"
    assert format_seconds(-0.25) == "-0.25"


@pytest.mark.parametrize("text", ["=1+1", "+cmd", "-2", "@SUM(A1)", "\tx", "\rx", "'quoted",
                                  "\uff1dcmd"])
def test_formula_starts_are_neutralized_and_restored(text):
    cell = neutralize_cell(text)
    assert cell == "'" + text
    assert restore_cell(cell) == text


@pytest.mark.parametrize("text", ["gpt-4o", "", "a=b", "ck-1"])
def test_harmless_text_is_left_alone(text):
    assert neutralize_cell(text) == text
    assert restore_cell(text) == text


# -------------------------------------------------------------------------------------------
# Latency sketch
# -------------------------------------------------------------------------------------------


def test_sketch_quantiles_on_known_data_within_one_percent():
    sketch = LatencySketch()
    values = [i / 1000.0 for i in range(1, 101)]  # 1 ms .. 100 ms
    random.Random(1).shuffle(values)
    for value in values:
        sketch.add(value)
    assert sketch.quantile(0.50) == pytest.approx(0.050, rel=0.01)
    assert sketch.quantile(0.95) == pytest.approx(0.095, rel=0.01)
    assert sketch.quantile(0.99) == pytest.approx(0.099, rel=0.01)
    assert sketch.quantile(1.0) == pytest.approx(0.100, rel=0.01)
    assert sketch.max_s == 0.1 and sketch.min_s == 0.001


def test_sketch_edge_cases():
    sketch = LatencySketch()
    assert sketch.quantile(0.5) is None
    sketch.add(0.0)
    assert sketch.quantile(0.5) == 0.0
    sketch.add(float("nan"))
    assert sketch.count == 1
    one = LatencySketch()
    one.add(7.0)
    assert one.quantile(0.01) == one.quantile(0.99) == 7.0  # clamped to the exact min/max


def test_sketch_memory_is_bounded():
    sketch = LatencySketch()
    rng = random.Random(2)
    for _ in range(50_000):
        sketch.add(10 ** rng.uniform(-9, 9))  # far wider than any real latency
    assert sketch.count == 50_000
    assert len(sketch._buckets) <= 1_400


# -------------------------------------------------------------------------------------------
# Summary
# -------------------------------------------------------------------------------------------


def test_calls_failures_429s_retries_and_call_latency():
    summary = Summary()
    summary.add_attempts([
        # call a: 429, wait 1 s, then ok -> one call, 1 retry, latency 0.1 + 1.0 + 0.2
        attempt(request_id="a", status_code=429, outcome="retry", duration_s=0.1,
                retry_delay_s=1.0, error_type="RateLimitError"),
        attempt(request_id="a", attempt=2, outcome="ok", duration_s=0.2, input_tokens=10,
                output_tokens=5),
        # call b: 429 retried, then 429 final -> a failed call
        attempt(request_id="b", status_code=429, outcome="retry", duration_s=0.1,
                retry_delay_s=0.5),
        attempt(request_id="b", attempt=2, status_code=429, outcome="error", duration_s=0.1),
        # call c on another model: ok at once
        attempt(request_id="c", model="m2", duration_s=0.3, input_tokens=7, output_tokens=3),
        # a connection error without a status
        attempt(request_id="d", model="m2", status_code=None, error_type="APIConnectionError",
                outcome="error", duration_s=0.05),
    ])
    rows = by_model(summary)
    m1, m2, total = rows["m1"], rows["m2"], rows[AGGREGATED]
    assert (m1["calls"], m1["failures"], m1["status_429"], m1["retries"], m1["attempts"]) == (
        2, 1, 3, 2, 4)
    assert (m2["calls"], m2["failures"], m2["status_429"], m2["retries"]) == (2, 1, 0, 0)
    assert (total["calls"], total["failures"], total["status_429"], total["retries"],
            total["attempts"]) == (4, 2, 3, 2, 6)
    assert (m1["input_tokens"], m1["output_tokens"]) == (10, 5)
    assert (total["input_tokens"], total["output_tokens"]) == (17, 8)
    # m1 call latencies: a = 1.3 s, b = 0.7 s -> the max is call a, sleeps included
    assert m1["latency_max_s"] == pytest.approx(1.3)
    assert m1["latency_p99_s"] == pytest.approx(1.3, rel=0.01)
    assert m1["latency_p50_s"] == pytest.approx(0.7, rel=0.01)
    assert [row["model"] for row in summary.rows()] == ["m1", "m2", AGGREGATED]


def test_calls_per_second_over_the_observed_span():
    summary = Summary()
    # ten calls of 0.5 s ending at t0 + 0.5 .. t0 + 9.5: span from t0 to t0 + 9.5
    t0 = 1_000.0
    for i in range(10):
        summary.add_attempt(attempt(request_id=f"r{i}", timestamp=t0 + i + 0.5, duration_s=0.5))
    row = by_model(summary)["m1"]
    assert row["span_s"] == pytest.approx(9.5)
    assert row["calls_per_s"] == pytest.approx(10 / 9.5)


def test_aggregated_rate_uses_the_whole_span():
    summary = Summary()
    summary.add_attempt(attempt(request_id="x", model="a", timestamp=10.0, duration_s=0.0))
    summary.add_attempt(attempt(request_id="y", model="a", timestamp=12.0, duration_s=0.0))
    summary.add_attempt(attempt(request_id="z", model="b", timestamp=14.0, duration_s=0.0))
    rows = by_model(summary)
    assert rows["a"]["calls_per_s"] == pytest.approx(1.0)
    assert rows["b"]["calls_per_s"] == 0.0  # one instant: no span to divide by
    assert rows[AGGREGATED]["calls_per_s"] == pytest.approx(3 / 4)


def test_unfinished_calls_and_unknown_outcomes_are_not_calls():
    summary = Summary()
    summary.add_attempt(attempt(request_id="killed", outcome="retry", status_code=429))
    summary.add_attempt(attempt(request_id="odd", outcome="weird"))
    total = summary.rows()[-1]
    assert total["attempts"] == 2
    assert total["calls"] == 0
    assert total["retries"] == 1
    assert total["latency_p50_s"] is None


def test_missing_model_gets_a_placeholder_row():
    summary = Summary()
    summary.add_attempt(attempt(model=None, operation="models", route="/models"))
    assert [row["model"] for row in summary.rows()] == ["(no model)", AGGREGATED]


def test_concurrent_adds_are_all_counted():
    summary = Summary()

    def work(thread: int) -> None:
        for i in range(500):
            rid = f"t{thread}-{i}"
            summary.add_attempt(attempt(request_id=rid, status_code=429, outcome="retry"))
            summary.add_attempt(attempt(request_id=rid, attempt=2, input_tokens=1))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    total = summary.rows()[-1]
    assert (total["calls"], total["retries"], total["status_429"], total["input_tokens"]) == (
        8_000, 8_000, 8_000, 8_000)
    assert len(summary._open) == 0


def test_table_is_fixed_width_and_locust_shaped():
    summary = Summary()
    summary.add_attempt(attempt(request_id="a", model="gpt-4o-mini", duration_s=0.25,
                                input_tokens=1200, output_tokens=340))
    summary.add_attempt(attempt(request_id="b", model="m", status_code=429, outcome="error",
                                duration_s=0.05, timestamp=1_714_564_801.0))
    lines = summary.format_table().splitlines()
    assert lines[0].split() == ["Model", "Calls", "Fails", "429s", "Retries", "p50", "ms", "p95",
                                "ms", "p99", "ms", "Queue", "p50", "Queue", "p95", "Queue", "%",
                                "Wire", "%", "Backoff", "%", "Tokens", "in", "Tokens", "out",
                                "Calls/s"]
    assert set(lines[1]) == {"-", "|"} and lines[1] == lines[-2]
    assert lines[2].split() == ["gpt-4o-mini", "1", "0", "0", "0", "250", "250", "250", "0", "0",
                                "0", "100", "0", "1200", "340", "4.00"]
    assert lines[3].split()[:4] == ["m", "1", "1", "1"]
    assert lines[-1].split()[:5] == [AGGREGATED, "2", "1", "1", "0"]
    data_lines = [lines[0], *lines[2:-2], lines[-1]]
    assert len({len(line) for line in data_lines}) == 1  # columns line up


def test_table_truncates_long_model_names_and_handles_no_data():
    summary = Summary()
    assert summary.format_table().splitlines()[-1].split() == [
        AGGREGATED, "0", "0", "0", "0", "-", "-", "-", "-", "-", "-", "-", "-", "0", "0", "0.00"]
    summary.add_attempt(attempt(model="x" * 100))
    line = summary.format_table().splitlines()[2]
    assert line.startswith("x" * 39 + "~ ")


def test_to_dict_is_json_ready():
    summary = Summary()
    summary.add_attempt(attempt(input_tokens=3))
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["total"]["calls"] == 1
    assert data["models"][0]["model"] == "m1"
    assert data["latency"] == {"per": "call", "relative_accuracy": 0.01}


# -------------------------------------------------------------------------------------------
# Where the time went
# -------------------------------------------------------------------------------------------


def test_call_latency_is_queue_plus_wire_plus_back_off_and_the_table_shows_the_split():
    summary = Summary()
    summary.add_attempts([
        # call a: queued 0.5 s, refused after 0.1 s, slept 1 s, queued 0.4 s, 0.2 s on the wire
        attempt(request_id="a", status_code=429, outcome="retry", queue_s=0.5, duration_s=0.1,
                retry_delay_s=1.0),
        attempt(request_id="a", attempt=2, queue_s=0.4, duration_s=0.2),
        # call b: admitted at once, 0.8 s on the wire
        attempt(request_id="b", queue_s=0.0, duration_s=0.8),
    ])
    row = by_model(summary)["m1"]
    assert row["latency_max_s"] == pytest.approx(2.2)  # call a, the whole wait
    assert row["queue_p95_s"] == pytest.approx(0.9, rel=0.01)  # per call: a queued 0.9 s
    assert row["queue_p50_s"] == 0.0  # b never waited
    assert (row["queue_s"], row["wire_s"], row["backoff_s"]) == pytest.approx((0.9, 1.1, 1.0))
    assert (row["queue_share"], row["wire_share"], row["backoff_share"]) == pytest.approx(
        (0.3, 1.1 / 3, 1.0 / 3))
    lines = summary.format_table().splitlines()
    cells = lines[2].split()
    assert cells[:8] == ["m1", "2", "0", "1", "1", "800", "2200", "2200"]
    assert cells[8] == "0" and int(cells[9]) == pytest.approx(900, rel=0.01)  # queue p50, p95
    assert cells[10:13] == ["30", "37", "33"]  # queue, wire, back-off: % of the calls' time


def test_a_csv_written_before_queue_s_existed_is_still_read(tmp_path):
    """Older files lack the column: they read with no queue time, whatever the column order."""
    old_fields = [name for name in ATTEMPT_FIELDS if name != "queue_s"][::-1]
    path = tmp_path / "old.csv"
    rows = [attempt(request_id="a", status_code=429, outcome="retry", duration_s=0.1,
                    retry_delay_s=1.0, timestamp=1_714_564_801.0),
            attempt(request_id="a", attempt=2, duration_s=0.2, timestamp=1_714_564_802.2)]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(old_fields)
        for record in rows:
            writer.writerow(["" if getattr(record, name) is None else
                             column_formatter(name)(getattr(record, name))
                             for name in old_fields])
    records = list(read_attempts(path))
    assert [record.queue_s for record in records] == [None, None]
    total = Summary.from_csv(path).rows()[-1]
    assert (total["calls"], total["retries"]) == (1, 1)
    assert total["latency_max_s"] == pytest.approx(1.3)
    assert (total["queue_s"], total["queue_p95_s"]) == (0.0, 0.0)
    series = read_series(str(path))
    assert list(series.call_latency) == pytest.approx([1.3])
    assert (list(series.call_queue), list(series.call_backoff)) == ([0.0], [1.0])
    assert list(series.start) == pytest.approx([1_714_564_800.9, 1_714_564_802.0])


def test_the_plot_reads_the_same_calls_as_the_table(tmp_path):
    path = tmp_path / "m.csv"
    header = ",".join(ATTEMPT_FIELDS)
    formatted = [attempt(request_id="a", status_code=429, outcome="retry", queue_s=0.5,
                         duration_s=0.1, retry_delay_s=0),
                 attempt(request_id="b", queue_s=0.25, duration_s=0.5),
                 attempt(request_id="a", attempt=2, queue_s=1.0, duration_s=0.2)]
    lines = [header] + [",".join("" if value is None else column_formatter(name)(value)
                                 for name, value in zip(ATTEMPT_FIELDS, record.as_tuple()))
                        for record in formatted]
    path.write_text("\n".join(lines) + "\nbroken,row\n", encoding="utf-8")
    series = read_series(str(path))
    assert series.skipped == 1
    assert list(series.call_queue) == [0.25, 1.5]
    assert list(series.call_wire) == pytest.approx([0.5, 0.3])
    assert list(series.call_latency) == pytest.approx([0.75, 1.8])
    summary = Summary.from_csv(path)
    assert summary.skipped_rows == 1
    assert summary.rows()[-1]["latency_max_s"] == pytest.approx(max(series.call_latency))


def test_open_calls_stay_bounded(monkeypatch):
    monkeypatch.setattr(open_calls_module, "MAX_OPEN_CALLS", 3)
    calls = OpenCalls()
    for i in range(5):
        assert calls.add(attempt(request_id=f"r{i}", outcome="retry", queue_s=1.0)) is None
    assert len(calls) == 3
    # the oldest were forgotten: their final attempt is a call on its own
    assert calls.add(attempt(request_id="r0", queue_s=0.5)).queue_us == 500_000
    assert calls.add(attempt(request_id="r4", queue_s=0.5)).queue_us == 1_500_000


# -------------------------------------------------------------------------------------------
# Cost per model
# -------------------------------------------------------------------------------------------

PRICES = PriceTable({"gpt-4o-mini": {"input": 0.15, "output": 0.60},
                     "text-embedding-3-small": {"input": 0.02, "output": 0.0}})


def test_cost_per_model_is_its_tokens_at_its_price_and_the_total_adds_them_up():
    summary = Summary(prices=PRICES)
    summary.add_attempt(attempt(request_id="a", model="gpt-4o-mini", input_tokens=1_000_000,
                                output_tokens=500_000))
    summary.add_attempt(attempt(request_id="b", model="text-embedding-3-small",
                                input_tokens=2_000_000))
    rows = by_model(summary)
    assert rows["gpt-4o-mini"]["cost_usd"] == pytest.approx(0.15 + 0.30)
    assert rows["text-embedding-3-small"]["cost_usd"] == pytest.approx(0.04)
    assert rows[AGGREGATED]["cost_usd"] == pytest.approx(0.49)
    lines = summary.format_table().splitlines()
    assert lines[0].split()[-2:] == ["Cost", "$"]
    assert lines[2].split()[-1] == "0.450000" and lines[-1].split()[-1] == "0.490000"
    assert len({len(line) for line in (lines[0], lines[2], lines[-1])}) == 1


def test_cost_only_where_the_price_is_known():
    summary = Summary(prices=PRICES)
    summary.add_attempt(attempt(request_id="a", model="gpt-4o-mini-2024-07-18",
                                input_tokens=1_000_000, output_tokens=0))
    summary.add_attempt(attempt(request_id="b", model="unpriced", input_tokens=10))
    rows = by_model(summary)
    assert rows["gpt-4o-mini-2024-07-18"]["cost_usd"] == pytest.approx(0.15)  # a snapshot
    assert rows["unpriced"]["cost_usd"] is None
    assert rows[AGGREGATED]["cost_usd"] is None  # a partial sum would understate it
    assert summary.format_table().splitlines()[-1].split()[-1] == "-"


def test_without_prices_there_is_no_cost_column():
    summary = Summary()
    summary.add_attempt(attempt(input_tokens=5, output_tokens=5))
    assert "Cost" not in summary.format_table()
    assert summary.rows()[-1]["cost_usd"] is None


def test_price_table_names_models_and_their_dated_snapshots_only():
    assert PRICES.price_of("gpt-4o-mini") == ModelPrice(0.15, 0.60)
    assert PRICES.price_of("gpt-4o-mini-2024-07-18") == ModelPrice(0.15, 0.60)
    assert PRICES.price_of("gpt-4o-mini-0613") == ModelPrice(0.15, 0.60)
    assert PRICES.price_of("gpt-4o-mini-high") is None  # another model, not a snapshot
    assert PRICES.price_of("gpt-4o") is None and PRICES.price_of(None) is None
    assert PRICES.cost_usd("gpt-4o-mini", 2_000_000, 1_000_000) == pytest.approx(0.9)
