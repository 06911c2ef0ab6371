"""Ctrl-C on ``cometkit batch``, as a user presses it: a real subprocess sent SIGINT against a
sandbox started here, then rerun; every line must end up answered exactly once.

First press: nothing more is sent, the calls in flight finish and are written (so the sandbox
saw exactly the requests that have a line). Second press: the process leaves at once, without
waiting for the calls in flight. Every wait is bounded.
"""

from __future__ import annotations

import signal

from test_budget import tokens_of, write_lines
from test_cli_batch import (
    TIMEOUT_S,
    assert_each_once,
    cli_env,
    config_for,
    count_lines,
    interrupt_once,
    read_output,
    run_cli,
    start_cli,
    wait_for,
)

#: How late a slow answer comes: far longer than the second press may take to leave.
SLOW_S = 60.0


def stop(process) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=TIMEOUT_S)


def test_first_ctrl_c_in_a_budgeted_run_writes_in_flight_and_resumes(
        tmp_path, cometkit_sandbox_factory):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_lines(source, 60, max_tokens=12)
    sandbox = cometkit_sandbox_factory(latency_s=0.2)
    config = config_for(tmp_path, sandbox.base_url)
    env = cli_env(COMETAPI_KEY="sk-x")
    args = ("batch", source, "-o", output, "--config", config, "--concurrency", "4",
            "--max-total-tokens", "1000000", "--no-progress")
    err = tmp_path / "err"
    status = interrupt_once(*args, cwd=tmp_path, env=env, stderr_path=err,
                            when=lambda: count_lines(output) >= 8)
    assert status == 130, err.read_text()  # interrupted, not "budget reached"
    stderr = err.read_text()
    assert "interrupted: sending no more requests" in stderr
    assert "To resume, run the same command again" in stderr
    records = read_output(output)
    assert 8 <= len(records) < 60
    assert len({r["custom_id"] for r in records}) == len(records)
    assert sandbox.stats()["attempts"] == len(records)  # each sent request was written

    rerun = run_cli(*args, cwd=tmp_path, env=env)
    assert rerun.returncode == 0, rerun.stderr
    records = read_output(output)
    assert_each_once(records, ids)
    assert sandbox.stats()["attempts"] == 60
    assert tokens_of(records) <= 1_000_000


def test_second_ctrl_c_leaves_at_once_keeping_what_was_written(tmp_path,
                                                               cometkit_sandbox_factory):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_lines(source, 40)
    # a third of the answers come a minute late: workers get stuck on them while others
    # are answered and written
    flaky = cometkit_sandbox_factory(faults={"slow": 0.3}, slow_s=SLOW_S, seed=3)
    env = cli_env(COMETAPI_KEY="sk-x")
    args = ("batch", source, "-o", output, "--concurrency", "4", "--no-progress")
    err = tmp_path / "err"
    process = start_cli(*args, "--config", config_for(tmp_path, flaky.base_url), cwd=tmp_path,
                        env=env, stderr_path=err)
    try:
        wait_for(lambda: count_lines(output) >= 3
                 and flaky.stats()["faults_injected"].get("slow", 0) >= 1)
        process.send_signal(signal.SIGINT)
        wait_for(lambda: "interrupted" in err.read_text())
        assert process.poll() is None, "a slow answer is still in flight: the run waits for it"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=SLOW_S / 3)  # at once, not after the slow answers
    finally:
        stop(process)
    assert process.returncode == 130
    stderr = err.read_text()
    assert "abandoned the requests in flight" in stderr and "To resume" in stderr
    written = read_output(output)  # whole lines only
    assert len(written) >= 3 and len({r["custom_id"] for r in written}) == len(written)

    fast = cometkit_sandbox_factory()
    rerun = run_cli(*args, "--config", config_for(tmp_path, fast.base_url), cwd=tmp_path,
                    env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {len(written)} of 40 requests already answered" in rerun.stderr
    assert_each_once(read_output(output), ids)
    assert fast.stats()["attempts"] == 40 - len(written)  # only the rest was sent again
