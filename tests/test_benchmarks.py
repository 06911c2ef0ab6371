"""The benchmark suite runs and produces its table; its re-statement of the guide's 429 loop is
faithful; ratios are taken against the right row. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``benchmarks`` lives at the repository root, not installed
    sys.path.insert(0, str(REPO))

from benchmarks import budget, deadline, goodput, limits, priority  # noqa: E402
from benchmarks.__main__ import parser  # noqa: E402
from benchmarks.contenders import GUIDE_ATTEMPTS, Spec, expected_answer, guide_retry  # noqa: E402
from benchmarks.report import (  # noqa: E402
    budget_table,
    deadline_table,
    limits_table,
    priority_table,
    results_markdown,
    table,
)
from benchmarks.runner import Row, Suite  # noqa: E402


class RateLimited(Exception):
    pass


def _flaky(failures: list):
    """A send that raises the given exceptions in turn, then answers ``None`` (success)."""
    sent = []

    def send():
        sent.append(len(sent))
        if failures:
            raise failures.pop(0)
        return None

    return send, sent


def test_guide_loop_waits_min_30_2_pow_attempt_plus_jitter_and_gives_up_after_five():
    sleeps = []
    send, sent = _flaky([RateLimited() for _ in range(10)])
    with pytest.raises(RateLimited):
        guide_retry(send, is_rate_limit=lambda e: isinstance(e, RateLimited),
                    sleep=sleeps.append, draw=lambda: 0.25)
    assert len(sent) == GUIDE_ATTEMPTS == 5
    assert sleeps == [1.25, 2.25, 4.25, 8.25]


def test_guide_loop_succeeds_after_a_429_and_never_retries_other_errors():
    sleeps = []
    send, sent = _flaky([RateLimited()])
    assert guide_retry(send, is_rate_limit=lambda e: isinstance(e, RateLimited),
                       sleep=sleeps.append, draw=lambda: 0.0) is None
    assert (len(sent), sleeps) == (2, [1.0])

    send, sent = _flaky([ValueError("500")])
    with pytest.raises(ValueError):
        guide_retry(send, is_rate_limit=lambda e: isinstance(e, RateLimited),
                    sleep=sleeps.append, draw=lambda: 0.0)
    assert len(sent) == 1


def _row(key: str, threads: int, cpu_s: float, baseline: bool = False) -> Row:
    return Row(bench="b", key=key, client=key, calls=1000, threads=threads, ok=1000, failed=0,
               wall_s=1.0, cpu_s=cpu_s, baseline=baseline)


def test_cpu_ratio_is_against_the_requests_row_with_the_same_thread_count():
    rows = [_row("requests-8", 8, 1.0, baseline=True), _row("requests-64", 64, 2.0,
                                                              baseline=True),
            _row("cometkit-8", 8, 0.5), _row("cometkit-64", 64, 0.5)]
    lines = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")]
             for line in table(rows).splitlines()[2:]}
    ratio_column = 10
    assert lines["cometkit-8"][ratio_column] == "0.50"
    assert lines["cometkit-64"][ratio_column] == "0.25"
    assert lines["requests-8"][ratio_column] == "1.00"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_overhead_run_prints_the_table_and_writes_results(tmp_path):
    pytest.importorskip("openai")
    output = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "overhead",
         "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = _overhead_rows(done.stdout)
    assert set(printed) == {"requests Session.post", "cometkit (default plugins + CSV)",
                            "cometkit (no plugins)", "requests PreparedRequest + HTTPAdapter.send",
                            "urllib3 PoolManager", "openai SDK",
                            "openai SDK through cometkit (default plugins)"}
    assert all(cells[5] == "0" for cells in printed.values())  # Failed: none
    assert printed["requests Session.post"][10] == "1.00"      # the baseline of the ratios
    assert "default plugins + CSV: CPU/call <= 0.9x requests Session.post" in done.stdout
    written = output.read_text()
    assert "## Results" in written and "## Targets" in written
    for fact in ("| CPU |", "| Cores |", "| Python |", "| OS |", "| Libraries |"):
        assert fact in written
    assert _overhead_rows(written) == printed


def _overhead_rows(text: str) -> dict:
    """Client -> cells of the table's overhead rows."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 2 and cells[1] == "overhead":
            rows[cells[2]] = cells
    return rows


# -- the "share of the limit achieved" suite --------------------------------------------------


def test_bucket_ideal_is_the_burst_at_once_then_one_call_per_refill():
    # The goodput benchmark's closed form, for the same bucket.
    assert limits.bucket_ideal_s([1] * 200, 20, 20, 0.05) == pytest.approx(
        goodput.ideal_wall_s(200))
    # nginx limit_req burst=5: six at once (the first plus five saved up), then 20/s.
    assert limits.bucket_ideal_s([1] * 200, 20, 5 + 1) == pytest.approx(194 / 20)
    assert limits.bucket_ideal_s([1] * 6, 20, 6, 0.05) == pytest.approx(0.05)
    # A cost above the capacity goes when the bucket is full and leaves a debt to wait out.
    assert limits.bucket_ideal_s([30, 1], 1.0, 10.0) == pytest.approx(21.0)
    assert limits.bucket_ideal_s([5, 5, 5], 1.0, 10.0) == pytest.approx(5.0)


def test_window_ideal_counts_the_windows_a_perfect_client_must_wait_for():
    assert limits.window_ideal_s(40, 10, 10.0, 0.05) == pytest.approx(30.05)
    assert limits.window_ideal_s(41, 10, 10.0) == pytest.approx(40.0)
    assert limits.window_ideal_s(10, 10, 10.0, 0.05) == pytest.approx(0.05)
    assert limits.window_ideal_s(90, 30, 60.0) == pytest.approx(120.0)
    # A calendar minute entered 1 s in: the next window opens 59 s later.
    assert limits.window_ideal_s(40, 20, 60.0, 0.05, phase_s=1.0) == pytest.approx(59.05)
    assert limits.in_flight_ideal_s(100, 4, 0.2) == pytest.approx(5.0)
    assert limits.in_flight_ideal_s(101, 4, 0.2) == pytest.approx(5.2)


def test_each_shape_ideal_matches_its_limit():
    shapes = {shape.key: shape for shape in limits.SHAPES}
    assert shapes["rps"].ideal(200, 0.0) == pytest.approx(9.05)
    assert shapes["window-10-10s"].ideal(40, 0.0) == pytest.approx(30.05)
    assert shapes["window-30-60s"].ideal(90, 0.0) == pytest.approx(120.05)
    assert shapes["calendar-minute"].ideal(40, 1.0) == pytest.approx(59.05)
    assert shapes["nginx"].ideal(200, 0.0) == pytest.approx(194 / 20 + 0.05)
    assert shapes["in-flight"].ideal(100, 0.0) == pytest.approx(5.0)
    assert shapes["fleet-2"].ideal(200, 0.0) == pytest.approx(180 / 20 + 0.01)


def test_clock_aligned_runs_start_at_the_same_point_of_a_window():
    assert limits.next_start_at(100.5, 60.0, phase_s=1.0, lead_s=5.0) == 121.0
    assert limits.next_start_at(50.0, 60.0, phase_s=1.0, lead_s=5.0) == 61.0
    assert limits.next_start_at(56.0, 60.0, phase_s=1.0, lead_s=5.0) == 61.0
    assert limits.next_start_at(56.5, 60.0, phase_s=1.0, lead_s=5.0) == 121.0


def test_token_shape_prompts_are_padded_to_their_length_and_checked_whole():
    chars = limits.prompt_chars(60)
    assert chars == limits.prompt_chars(60)  # the same for every client and run
    assert all(100 <= n <= 3000 for n in chars) and len(set(chars)) > 30
    spec = Spec("cometkit", "http://127.0.0.1:9/v1", 60, 16, prompt_chars=chars)
    for i in (0, 7, 59):
        text = spec.messages(i)[0]["content"]
        assert len(text) == chars[i] and text.startswith(f"prompt {i} ")
        assert spec.check(i, f"echo: {text}") is None
        assert spec.check(i, f"echo: {text[:-1]}") == "WrongAnswer"
    # Without lengths, the short prompt every other benchmark sends.
    assert Spec("openai", "u", 1, 1).messages(3) == [{"role": "user", "content": "prompt 3"}]
    assert expected_answer(3) == "echo: prompt 3"


def test_every_shape_has_every_client_and_quick_runs_are_a_subset():
    full, quick = list(limits.runs(False)), list(limits.runs(True))
    assert {run.shape.key for run in full} == {shape.key for shape in limits.SHAPES}
    assert {run.shape.key for run in quick} < {run.shape.key for run in full}
    assert all(run.calls <= run.shape.calls for run in quick)
    keys = [run.key for run in full]
    assert len(keys) == len(set(keys))
    for shape in limits.SHAPES:
        clients = [run for run in full if run.shape is shape]
        if shape.fleet:
            assert [run.client.contender for run in clients] == ["cometkit"]
            continue
        assert [run.client.key for run in clients] == [c.key for c in limits.CLIENTS]
        told = next(run for run in clients if run.client.told)
        assert told.plugins == {"limiter": shape.told}
        assert all(str(value) in told.label for value in shape.told.values())
    assert parser().parse_args(["--only", "limits"]).only == ["limits"]


def _limit_row(key: str, ok: int, calls: int, wall_s: float, ideal_s: float, rate_limited: int,
               **fields) -> Row:
    return Row(bench=limits.NAME, key=key, client=fields.pop("client", key), calls=calls,
               threads=16, ok=ok, failed=calls - ok, wall_s=wall_s, ideal_wall_s=ideal_s,
               attempts=calls + rate_limited, rate_limited=rate_limited, shape="a shape",
               **fields)


def test_limits_table_shows_calls_ok_wall_over_ideal_and_429_share():
    rows = [_limit_row("s:cometkit-defaults", 37, 40, 45.0, 30.0, 12,
                       client="cometkit (defaults)", errors={"RateLimitError": 3}),
            _limit_row("s:openai", 40, 40, 31.0, 30.0, 0, client="openai SDK"),
            _limit_row("s:cometkit-told", 0, 40, 150.0, 30.0, 0, client="cometkit (told)",
                       timed_out_s=150.0),
            _row("requests-8", 8, 1.0, baseline=True)]
    rendered = limits_table(rows)
    lines = {cells[2]: cells for cells in
             ([c.strip() for c in line.split("|")] for line in rendered.splitlines()[2:])}
    assert lines["cometkit (defaults)"][3:] == ["37/40 (RateLimitError 3)", "45.00", "30.00",
                                                "1.50", "52", "12", "30%", ""]
    assert lines["openai SDK"][6] == "1.03"
    assert lines["cometkit (told)"][3] == "over its 150 s cap"
    assert lines["cometkit (told)"][6] == ""  # no ratio for a run that did not finish
    assert "requests-8" not in rendered
    # The main table leaves the limit rows to their own table, and RESULTS.md shows both.
    assert "cometkit (defaults)" not in table(rows) and "requests-8" in table(rows)
    written = results_markdown(rows, [], command="python -m benchmarks", host={"CPU": "x"},
                               elapsed_s=60.0)
    assert "## Share of the limit achieved" in written and rendered in written
    assert limits_table([_row("requests-8", 8, 1.0)]) == ""


def test_limits_targets_are_checked_per_client_and_a_timed_out_run_misses_them():
    suite = Suite(rows=[
        _limit_row("s:cometkit-defaults", 40, 40, 34.0, 30.0, 3, client="cometkit (defaults)"),
        _limit_row("s:cometkit-told", 40, 40, 32.0, 30.0, 0, client="cometkit (told)"),
        _limit_row("s:openai", 30, 40, 20.0, 30.0, 50, client="openai SDK"),
        _limit_row("t:cometkit-defaults", 0, 40, 150.0, 30.0, 0, client="cometkit (defaults)",
                   timed_out_s=150.0),
    ])
    limits.check(suite)
    assert not any("openai" in c.target for c in suite.checks)  # goals are cometkit's
    assert [(c.target.split(" / ", 1)[1], c.passed) for c in suite.checks[:5]] == [
        ("cometkit (defaults): every call ok", True),
        ("cometkit (defaults): wall <= 1.15x ideal", True),   # 1.13x
        ("cometkit (defaults): 429s < 10% of calls", True),   # 7.5 %
        ("cometkit (told): every call ok", True),
        ("cometkit (told): wall <= 1.05x ideal", False),      # 1.07x
    ]
    timed_out = suite.checks[5:]
    assert [c.passed for c in timed_out] == [False, False, False]
    assert "time cap" in timed_out[0].measured


def _deadline_row(key: str, ok: int, longest_s, errors: dict) -> Row:
    return Row(bench=deadline.NAME, key=key, client="cometkit, deadline 2 s", calls=4,
               threads=4, ok=ok, failed=4 - ok, wall_s=4.0, errors=errors, attempts=4,
               deadline_s=2.0, info={"case": f"case {key}",
                                     **({} if longest_s is None else {"max_call_s": longest_s})})


def test_deadline_rows_have_their_own_table_and_are_checked_against_d_plus_a_quarter():
    rows = [_deadline_row("a", 0, 2.004, {"APITimeoutError": 4}),
            _deadline_row("b", 1, 2.31, {"APITimeoutError": 3}),
            _deadline_row("c", 3, 0.5, {"RateLimitError": 1}),
            _deadline_row("d", 0, None, {"APITimeoutError": 4}),
            _row("requests-8", 8, 1.0, baseline=True)]
    suite = Suite(rows=rows[:4])
    deadline._checks(suite)
    assert [(c.target.split(":")[0], c.passed) for c in suite.checks] == [
        ("case a", True), ("case a", True),
        ("case b", False), ("case b", True),     # 2.31 s > 2.25 s
        ("case c", True), ("case c", False),     # another error than APITimeoutError
        ("case d", False), ("case d", True),     # no call timed: not met
    ]
    rendered = deadline_table(rows)
    cells = [c.strip() for c in rendered.splitlines()[2].split("|")][1:-1]
    assert cells == ["case a", "cometkit, deadline 2 s", "0/4 (APITimeoutError 4)", "4",
                     "2.00", "2.004", "2.25", "4", "4.00"]
    assert "requests-8" not in rendered
    assert "case a" not in table(rows) and "requests-8" in table(rows)
    written = results_markdown(rows, [], command="python -m benchmarks", host={"CPU": "x"},
                               elapsed_s=60.0)
    assert "## Deadline bound" in written and rendered in written
    assert deadline_table([_row("requests-8", 8, 1.0)]) == ""
    assert parser().parse_args(["--only", "deadline"]).only == ["deadline"]


def _priority_row(key: str, p95_s, wall_s: float, failed: int = 0) -> Row:
    return Row(bench=priority.NAME, key=key, client="cometkit, in-process limiter", calls=210,
               threads=16, ok=210 - failed, failed=failed, wall_s=wall_s, ideal_wall_s=10.0,
               priority_case=f"case {key}",
               info={"interactive_calls": 10, "queue_p50_s": 0.02, "queue_p95_s": p95_s,
                     "queue_max_s": p95_s, "send_interval_s": 0.051})


def test_priority_rows_have_their_own_table_and_are_checked_against_one_send_interval():
    assert priority.percentile([0.3, 0.1, 0.2, 0.4], 0.5) == 0.2
    assert priority.percentile(list(range(1, 21)), 0.95) == 19
    assert priority.percentile([], 0.95) is None
    met, slow, late = (_priority_row("lanes", 0.041, 10.5), _priority_row("lanes", 0.06, 10.0),
                       _priority_row("lanes", None, 11.5, failed=1))
    baseline = _priority_row("one-lane", 0.8, 10.0)
    for row, expected in ((met, [True, True, True]), (slow, [False, True, True]),
                          (late, [False, False, False])):
        suite = Suite(rows=[row, baseline])
        priority._checks(suite)
        assert [c.passed for c in suite.checks] == expected  # the baseline is not checked
    rows = [met, baseline, _row("requests-8", 8, 1.0, baseline=True)]
    rendered = priority_table(rows)
    cells = [c.strip() for c in rendered.splitlines()[2].split("|")][1:-1]
    assert cells == ["case lanes", "cometkit, in-process limiter", "210/210", "10", "20.0",
                     "41.0", "41.0", "51.0", "10.50", "10.00", "1.050"]
    assert "requests-8" not in rendered and "case lanes" not in table(rows)
    written = results_markdown(rows, [], command="python -m benchmarks", host={"CPU": "x"},
                               elapsed_s=60.0)
    assert "## Priority lanes" in written and rendered in written
    assert parser().parse_args(["--only", "priority"]).only == ["priority"]
    fleet = _priority_row("fleet", 0.5, 10.0)
    suite = Suite(rows=[fleet])
    priority._checks(suite)
    assert [c.passed for c in suite.checks] == [None, True, True]  # the fleet's wait: shown


def test_token_shape_ideal_charges_what_the_sandbox_counts():
    """The ideal of the token shape uses the server's own count (1.3x the chars / 4 estimate
    for the prompt), checked against the usage a real sandbox reports."""
    import cometkit
    from cometkit.sandbox import Sandbox

    chars = limits.prompt_chars(5)
    charges = limits.chat_charges(chars, 1.3)
    spec = Spec("cometkit", "", 5, 1, prompt_chars=chars)
    with Sandbox(token_ratio=1.3) as sandbox, \
            cometkit.Client("sk-bench-test", sandbox.base_url, config={"plugins": {}}) as client:
        usage = [client.chat.completions.create(model="gpt-4o-mini", messages=spec.messages(i))
                 .usage.total_tokens for i in range(5)]
    assert charges == usage
    assert charges[0] > len(limits.prompt(0, chars[0])) / 4 * 1.3  # prompt and answer
    shape = next(shape for shape in limits.SHAPES if shape.key == "tpm")
    rate_per_s = 40_000 / 60
    assert shape.ideal(60, 0.0) == pytest.approx(limits.bucket_ideal_s(
        limits.chat_charges(limits.prompt_chars(60), 1.3), rate_per_s, rate_per_s, 0.05))
    assert shape.ideal(60, 0.0) > 60  # about 90 s of tokens at 40k per minute


def _budget_row(key: str, spent: int, largest: int, *, ok: int = 40, attempts: int = 40,
                exit_code: int = 3, resent: int = 60, order_kept: bool = True) -> Row:
    return Row(bench=budget.NAME, key=key, client="cometkit batch", calls=100, threads=8,
               ok=ok, failed=0, wall_s=1.0, attempts=attempts, budget_tokens=500,
               info={"case": f"case {key}", "all_tokens": 1000, "spent": spent,
                     "largest_line": largest, "exit": exit_code, "left": 100 - ok,
                     "order_kept": order_kept, "resume_exit": 0, "resent": resent,
                     "total_lines": 100, "each_once": True})


def test_budget_rows_have_their_own_table_and_are_checked_against_the_budget():
    rows = [_budget_row("max-tokens", 480, 12), _budget_row("max-tokens", 501, 12),
            _budget_row("no-max-tokens", 600, 10), _budget_row("no-max-tokens", 700, 10),
            _budget_row("no-max-tokens", 400, 10, exit_code=0, attempts=41, resent=59),
            _row("requests-8", 8, 1.0, baseline=True)]
    suite = Suite(rows=rows[:5])
    budget._checks(suite)
    passed = [c.passed for c in suite.checks]
    assert passed[:8] == [True, True, True, True, True, False, True, True]  # 501 > 500
    assert passed[8:16] == [True, True, True, True,   # 600 <= 500 + 16 in flight x 10
                            True, False, True, True]  # 700 > 660
    assert passed[16:] == [False, True, False, False]  # exit 0; 41 sent for 40 lines
    rendered = budget_table(rows)
    cells = [c.strip() for c in rendered.splitlines()[2].split("|")][1:-1]
    assert cells == ["case max-tokens", "cometkit batch", "100", "8", "1,000", "500", "480",
                     "0", "40", "60", "3", "60"]
    assert [c.strip() for c in rendered.splitlines()[3].split("|")][8] == "1"  # overshoot
    assert "requests-8" not in rendered and "case max-tokens" not in table(rows)
    written = results_markdown(rows, [], command="python -m benchmarks", host={"CPU": "x"},
                               elapsed_s=60.0)
    assert "## Batch budget" in written and rendered in written
    assert budget_table([_row("requests-8", 8, 1.0)]) == ""
    assert parser().parse_args(["--only", "budget"]).only == ["budget"]
