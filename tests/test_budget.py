"""Batch budgets (``--max-total-tokens``, ``--max-cost``) and the ``prices:`` they read.

The budget's arithmetic is tested on its own (no clock: a waiting admission is observed
through its ``stopping`` callback, never timed); the batch is tested against the real sandbox,
in process and as the ``cometkit batch`` command. Every wait is bounded.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Optional

import pytest
from test_cli_batch import (
    assert_each_once,
    cli_env,
    config_for,
    read_output,
    run_cli,
)

import cometkit
from cometkit import ConfigError
from cometkit.batch import BatchRunner
from cometkit.budget import Budget, Spend
from cometkit.prices import PriceTable

PRICES = PriceTable({"m1": {"input": 1.0, "output": 2.0}})
JOIN_S = 30.0


def body(prompt_chars: int = 8, max_tokens: Optional[int] = None, model: str = "m1") -> dict:
    out = {"model": model, "messages": [{"role": "user", "content": "x" * prompt_chars}]}
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return out


class Waiting:
    """A ``stopping`` callback that tells when ``admit`` looked a second time (it waits)."""

    def __init__(self) -> None:
        self.calls = 0
        self.looked_again = threading.Event()
        self.stop = threading.Event()

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls >= 2:
            self.looked_again.set()
        return self.stop.is_set()


def admit_in_thread(budget: Budget, request: dict, stopping: Waiting) -> tuple:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(budget.admit(request,
                                                                     stopping=stopping)))
    thread.start()
    return thread, box


# -------------------------------------------------------------------------------------------
# the budget alone
# -------------------------------------------------------------------------------------------


def test_a_request_is_reserved_at_prompt_plus_max_tokens_and_settled_at_its_usage():
    budget = Budget(max_total_tokens=100)
    reservation = budget.admit(body(prompt_chars=40, max_tokens=30))
    assert reservation is not None and reservation.spend == Spend(10 + 30, 0.0)
    budget.settle(reservation, (10, 5), answered=True)
    assert budget.spent == Spend(15, 0.0) and not budget.reached


def test_the_budget_is_reached_by_the_first_request_that_would_pass_it():
    budget = Budget(max_total_tokens=50)
    first = budget.admit(body(prompt_chars=40, max_tokens=30))  # 40 reserved
    budget.settle(first, (10, 30), answered=True)               # 40 spent
    assert budget.admit(body(prompt_chars=40, max_tokens=30)) is None  # 40 + 40 > 50
    assert budget.reached
    assert budget.spent.tokens == 40
    assert budget.describe() == "40 of 50 tokens"


def test_a_request_waits_while_only_reservations_in_flight_stand_in_its_way():
    budget = Budget(max_total_tokens=100)
    in_flight = budget.admit(body(prompt_chars=40, max_tokens=50))  # 60 reserved
    stopping = Waiting()
    thread, box = admit_in_thread(budget, body(prompt_chars=40, max_tokens=50), stopping)
    assert stopping.looked_again.wait(JOIN_S), "the second request should wait, not decide"
    assert not box
    budget.settle(in_flight, (10, 5), answered=True)  # spent 15: 15 + 60 fits
    thread.join(JOIN_S)
    assert box and box[0] is not None and not budget.reached


def test_a_model_without_an_answer_yet_goes_one_request_at_a_time():
    budget = Budget(max_total_tokens=10_000)
    first = budget.admit(body())  # no max_tokens, nothing learned: its answer is unknown
    assert first is not None
    stopping = Waiting()
    thread, box = admit_in_thread(budget, body(), stopping)
    assert stopping.looked_again.wait(JOIN_S)
    assert not box
    budget.settle(first, (2, 7), answered=True)  # the longest answer is now 7 tokens
    thread.join(JOIN_S)
    assert box[0] is not None and box[0].spend.tokens == 2 + 7
    assert budget.admit(body()) is not None  # sure now: no waiting with one in flight


def test_stopping_ends_a_wait_without_reaching_the_budget():
    budget = Budget(max_total_tokens=100)
    budget.admit(body(prompt_chars=40, max_tokens=60))
    stopping = Waiting()
    thread, box = admit_in_thread(budget, body(prompt_chars=40, max_tokens=60), stopping)
    assert stopping.looked_again.wait(JOIN_S)
    stopping.stop.set()  # Ctrl-C while it waited
    thread.join(JOIN_S)
    assert box == [None] and not budget.reached


def test_an_answer_without_usage_counts_at_its_reservation_a_failure_at_nothing():
    budget = Budget(max_total_tokens=1000)
    ok = budget.admit(body(prompt_chars=40, max_tokens=10))
    failed = budget.admit(body(prompt_chars=40, max_tokens=10))
    budget.settle(ok, None, answered=True)
    budget.settle(failed, None, answered=False)
    assert budget.spent.tokens == 20


def test_the_prompt_estimate_learns_what_the_model_counts():
    budget = Budget(max_total_tokens=10_000)
    first = budget.admit(body(prompt_chars=40, max_tokens=1))  # estimated 10 prompt tokens
    budget.settle(first, (15, 1), answered=True)                # the model counted 15
    assert budget.admit(body(prompt_chars=80, max_tokens=1)).spend.tokens == 30 + 1


def test_a_cost_budget_prices_each_model_and_earlier_runs_count():
    budget = Budget(max_cost_usd=0.0001, prices=PRICES)
    budget.add_earlier({"m1": (20, 30, 20)})  # 30 in at $1/M, 20 out at $2/M: $0.00007
    assert budget.earlier.cost_usd == pytest.approx(0.00007)
    exact = budget.admit(body(prompt_chars=40, max_tokens=10))  # +$0.00003: exactly the cap
    assert exact is not None and exact.spend.cost_usd == pytest.approx(0.00003)
    budget.settle(exact, None, answered=False)
    assert budget.admit(body(prompt_chars=40, max_tokens=11)) is None  # +$0.000032 > cap
    assert budget.describe() == "$0.000070 of $0.000100"


def test_a_cost_budget_refuses_a_model_without_a_price_naming_file_and_key():
    budget = Budget(max_cost_usd=1, prices=PRICES, prices_where="cometkit.yaml")
    budget.check_prices(["m1", "m1-2024-07-18"])  # a dated snapshot takes m1's price
    with pytest.raises(ConfigError) as info:
        budget.check_prices(["m1", "gpt-x", "gpt-y"], sent_from="in.jsonl")
    text = str(info.value)
    assert text.startswith("cometkit.yaml: prices.gpt-x: no price for model 'gpt-x' in in.jsonl")
    assert "also missing: gpt-y" in text and "Add it: prices: {gpt-x: {input:" in text
    assert info.value.path == "cometkit.yaml" and info.value.key == "prices.gpt-x"
    Budget(max_total_tokens=5).check_prices(["gpt-x"])  # a token budget needs no prices


@pytest.mark.parametrize("kwargs", [{}, {"max_total_tokens": 0}, {"max_total_tokens": 1.5},
                                    {"max_cost_usd": 0}, {"max_cost_usd": float("nan")},
                                    {"max_cost_usd": True}])
def test_a_budget_needs_a_positive_limit(kwargs):
    with pytest.raises(ValueError):
        Budget(**kwargs)


# -------------------------------------------------------------------------------------------
# a batch with a budget, in process, against the sandbox
# -------------------------------------------------------------------------------------------


def write_lines(path: Path, n: int, *, max_tokens: Optional[int] = None) -> list:
    ids = []
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            custom_id = f"q{i:03d}"
            line = {"custom_id": custom_id, "model": "m1",
                    "prompt": f"say {custom_id} " + "and more " * (i % 7)}
            if max_tokens is not None:
                line["max_tokens"] = max_tokens
            handle.write(json.dumps(line) + "\n")
            ids.append(custom_id)
    return ids


def tokens_of(records: list) -> int:
    return sum(r["response"]["body"]["usage"]["total_tokens"] for r in records)


def run_batch(source: Path, output: Path, base_url: str, budget: Optional[Budget],
              concurrency: int = 4):
    with cometkit.Client("sk-test", base_url, concurrency=concurrency) as client, \
            BatchRunner(source, output) as runner:
        return runner.run(client, budget=budget)


def test_a_batch_stops_before_passing_its_budget_and_resumes_with_a_higher_one(
        tmp_path, cometkit_sandbox_factory):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_lines(source, 60, max_tokens=12)
    sandbox = cometkit_sandbox_factory(latency_s=0.01)
    full = run_batch(source, tmp_path / "all.jsonl", sandbox.base_url, None)
    assert full.ok == 60
    all_tokens = tokens_of(read_output(tmp_path / "all.jsonl"))
    sandbox.reset_stats()

    half = all_tokens // 2
    result = run_batch(source, output, sandbox.base_url, Budget(max_total_tokens=half))
    records = read_output(output)
    assert result.budget_reached and not result.interrupted and not result.complete
    assert result.unanswered == 60 - len(records) > 0
    # with max_tokens on every line the reservation bounds each answer: never passed
    assert tokens_of(records) <= half
    # the lines sent are the first ones, each written; none was sent after the stop
    assert sorted(r["custom_id"] for r in records) == ids[:len(records)]
    assert sandbox.stats()["attempts"] == len(records)
    # and the next line would have passed it (its estimate: prompt + max_tokens)
    next_line = json.loads(source.read_text().splitlines()[len(records)])
    estimate = -(-len(next_line["prompt"]) // 4) + 12
    assert tokens_of(records) + estimate > half

    again = run_batch(source, output, sandbox.base_url, Budget(max_total_tokens=half))
    assert again.budget_reached and again.ok == 0  # the budget covers the whole job
    assert sandbox.stats()["attempts"] == len(records)

    rest = run_batch(source, output, sandbox.base_url, Budget(max_total_tokens=2 * all_tokens))
    assert rest.complete and not rest.budget_reached
    assert_each_once(read_output(output), ids)
    assert sandbox.stats()["attempts"] == 60  # no line was sent twice


def test_without_max_tokens_the_overshoot_is_at_most_what_was_in_flight(
        tmp_path, cometkit_sandbox_factory):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_lines(source, 60)
    sandbox = cometkit_sandbox_factory(latency_s=0.01)
    budget = Budget(max_total_tokens=300)
    concurrency = 4
    result = run_batch(source, output, sandbox.base_url, budget, concurrency)
    records = read_output(output)
    assert result.budget_reached
    largest = max(r["response"]["body"]["usage"]["total_tokens"] for r in records)
    window = 2 * concurrency  # what the runner keeps in flight at most
    assert budget.spent.tokens == tokens_of(records) <= 300 + window * largest
    assert sorted(r["custom_id"] for r in records) == ids[:len(records)]
    assert sandbox.stats()["attempts"] == len(records)


def test_run_refuses_a_cost_budget_without_prices_before_sending(tmp_path, cometkit_sandbox):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, 3)
    with pytest.raises(ConfigError, match="no price for model 'm1'"):
        run_batch(source, output, cometkit_sandbox.base_url, Budget(max_cost_usd=1))
    assert cometkit_sandbox.stats()["attempts"] == 0
    with pytest.raises(TypeError, match="budget must be"):
        run_batch(source, output, cometkit_sandbox.base_url, 100)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------
# cometkit batch --max-total-tokens / --max-cost
# -------------------------------------------------------------------------------------------

PRICES_YAML = "prices:\n  m1: {input: 1.0, output: 2.0}\n"


def test_cli_budget_exits_3_says_what_was_spent_and_resumes(tmp_path, cometkit_sandbox_factory):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_lines(source, 40, max_tokens=12)
    sandbox = cometkit_sandbox_factory()
    config = config_for(tmp_path, sandbox.base_url, PRICES_YAML)
    env = cli_env(COMETAPI_KEY="sk-x")
    args = ("batch", source, "-o", output, "--config", config, "--concurrency", "4",
            "--no-progress")
    first = run_cli(*args, "--max-total-tokens", "400", cwd=tmp_path, env=env)
    assert first.returncode == 3, first.stderr
    records = read_output(output)
    spent = tokens_of(records)
    left = 40 - len(records)
    assert 0 < left < 40 and spent <= 400
    assert (f"budget reached: spent {spent:,} of 400 tokens; the next request would pass it, "
            f"so {left} of 40 requests were not sent") in first.stderr
    assert f"rerun with a higher --max-total-tokens:\n  cometkit batch {source}" in first.stderr
    assert "Cost $" in first.stderr  # the summary table prices the model
    assert sandbox.stats()["attempts"] == len(records)

    cost = run_cli(*args, "--max-cost", "0.5", cwd=tmp_path, env=env)
    assert cost.returncode == 0, cost.stderr
    assert_each_once(read_output(output), ids)
    assert sandbox.stats()["attempts"] == 40


def test_cli_cost_budget_stops_at_the_cost(tmp_path, cometkit_sandbox_factory):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, 40, max_tokens=12)
    sandbox = cometkit_sandbox_factory()
    config = config_for(tmp_path, sandbox.base_url, PRICES_YAML)
    done = run_cli("batch", source, "-o", output, "--config", config, "--max-cost", "$0.0005",
                   "--no-progress", cwd=tmp_path, env=cli_env(COMETAPI_KEY="sk-x"))
    assert done.returncode == 3, done.stderr
    records = read_output(output)
    usage = [r["response"]["body"]["usage"] for r in records]
    cost = sum(u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0 for u in usage) / 1e6
    assert 0 < cost <= 0.0005
    assert "of $0.000500" in done.stderr and "--max-cost" in done.stderr


def test_cli_unknown_price_is_a_config_error_before_anything_is_sent(tmp_path, cometkit_sandbox):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(source, 5)
    config = config_for(tmp_path, cometkit_sandbox.base_url, "prices:\n  other: "
                                                             "{input: 1, output: 1}\n")
    done = run_cli("batch", source, "-o", output, "--config", config, "--max-cost", "1",
                   cwd=tmp_path, env=cli_env(COMETAPI_KEY="sk-x"))
    assert done.returncode == 2
    assert (f"cometkit: error: {config}: prices.m1: no price for model 'm1' in {source}"
            in done.stderr)
    assert "Add it: prices: {m1: {input:" in done.stderr and "Nothing was sent" in done.stderr
    assert cometkit_sandbox.stats()["attempts"] == 0
    assert not output.exists()


@pytest.mark.parametrize("flag, value", [("--max-total-tokens", "0"), ("--max-cost", "-1"),
                                         ("--max-cost", "five")])
def test_cli_budget_flags_are_checked(tmp_path, flag, value):
    source = tmp_path / "in.jsonl"
    write_lines(source, 1)
    done = run_cli("batch", source, "-o", "out.jsonl", "--sandbox", flag, value, cwd=tmp_path)
    assert done.returncode == 2 and flag in done.stderr


def test_report_shows_cost_per_model_from_the_configured_prices(tmp_path, cometkit_sandbox):
    source = tmp_path / "in.jsonl"
    write_lines(source, 10)
    config = config_for(tmp_path, cometkit_sandbox.base_url, PRICES_YAML)
    env = cli_env(COMETAPI_KEY="sk-x")
    done = run_cli("batch", source, "-o", "out.jsonl", "--config", config, "--metrics-csv",
                   "m.csv", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    usage = [r["response"]["body"]["usage"] for r in read_output(tmp_path / "out.jsonl")]
    cost = sum(u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0 for u in usage) / 1e6

    report = run_cli("report", "m.csv", "--config", config, cwd=tmp_path, env=env)
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert lines[0].split()[-2:] == ["Cost", "$"]
    assert next(line for line in lines if line.startswith("m1")).split()[-1] == f"{cost:.6f}"
    as_json = run_cli("report", "m.csv", "--json", "--config", config, cwd=tmp_path, env=env)
    assert json.loads(as_json.stdout)["total"]["cost_usd"] == pytest.approx(cost)
    plain = run_cli("report", "m.csv", cwd=tmp_path, env=env)  # no prices: no cost column
    assert plain.returncode == 0 and "Cost" not in plain.stdout
