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

from benchmarks.contenders import GUIDE_ATTEMPTS, guide_retry  # noqa: E402
from benchmarks.report import table  # noqa: E402
from benchmarks.runner import Row  # noqa: E402


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
                            "urllib3 PoolManager", "openai SDK"}
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
