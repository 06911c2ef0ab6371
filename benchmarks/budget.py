"""The batch budget's bound: ``cometkit batch --max-total-tokens`` stops before passing it.

``cometkit batch`` runs as a user runs it, against a sandbox process, on N lines, first without
a budget (what the whole batch costs: T tokens, from the answers' ``usage``), then into a
fresh output with a budget of T / 2. That run must end with exit status 3 having spent at most
the budget (with ``max_tokens`` on every line the reservations bound every answer) -- or, without
``max_tokens``, at most the budget plus what the calls in flight could add -- with every
request the sandbox saw written, and the lines sent being the first ones. A rerun with a budget
of 2 T then sends exactly the lines left: each line ends up answered once.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from cometkit.sandbox import SandboxProcess

from .contenders import MODEL, prompt
from .runner import BenchmarkError, Row, Suite, child_env, run_child, server_counts, tail

NAME = "budget"
TITLE = "Batch budget bound (--max-total-tokens of half the batch's tokens)"

CONCURRENCY = 8
#: What the runner keeps in flight at most (twice the concurrency).
WINDOW = 2 * CONCURRENCY
EXIT_BUDGET = 3
TIMEOUT_S = 300.0
#: Prompt lengths, in turn: the sandbox echoes them, so answers vary in length too.
PROMPT_CHARS = tuple(40 + 40 * k for k in range(9))
#: (key, case, max_tokens of every line or None)
CASES = (
    ("max-tokens", "every line with max_tokens: 40", 40),
    ("no-max-tokens", "no max_tokens (answers estimated)", None),
)


def write_input(path: Path, lines: int, max_tokens: Optional[int]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(lines):
            line: dict = {"custom_id": f"req-{i}", "prompt": prompt(i, PROMPT_CHARS[i % 9]),
                          "model": MODEL}
            if max_tokens is not None:
                line["max_tokens"] = max_tokens
            out.write(json.dumps(line) + "\n")


def read_spend(path: Path) -> tuple:
    """``(lines, tokens, largest line, ids in order)`` of a batch output."""
    tokens = largest = 0
    ids = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            usage = ((record.get("response") or {}).get("body") or {}).get("usage") or {}
            used = int(usage.get("total_tokens") or 0)
            tokens += used
            largest = max(largest, used)
            ids.append(record["custom_id"])
    return len(ids), tokens, largest, ids


def batch(sandbox: SandboxProcess, source: Path, output: Path, config: Path,
          budget: Optional[int]) -> Any:
    argv = [sys.executable, "-m", "cometkit", "batch", str(source), "-o", str(output),
            "--config", str(config), "--concurrency", str(CONCURRENCY), "--no-progress"]
    if budget is not None:
        argv += ["--max-total-tokens", str(budget)]
    child = run_child(argv, env=child_env(), timeout_s=TIMEOUT_S)
    if child.returncode not in (0, EXIT_BUDGET):
        raise BenchmarkError(f"cometkit batch exited with {child.returncode}:\n"
                             f"{tail(child.stderr)}")
    return child


def run_case(sandbox: SandboxProcess, tmp: Path, key: str, case: str,
             max_tokens: Optional[int], lines: int, log: Callable[[str], Any]) -> Row:
    source, config = tmp / f"in-{key}.jsonl", tmp / "c.yaml"
    write_input(source, lines, max_tokens)
    config.write_text(f"base_url: {sandbox.base_url}\napi_key: sk-benchmark\n")
    batch(sandbox, source, tmp / f"all-{key}.jsonl", config, None)
    _, all_tokens, _, _ = read_spend(tmp / f"all-{key}.jsonl")
    budget = all_tokens // 2

    output = tmp / f"out-{key}.jsonl"
    sandbox.reset_stats()
    stopped = batch(sandbox, source, output, config, budget)
    sent, spent, largest, ids = read_spend(output)
    counts = server_counts(sandbox.stats(), warmup=0)
    order_kept = sorted(ids, key=lambda i: int(i.rpartition("-")[2])) == [
        f"req-{i}" for i in range(sent)]

    sandbox.reset_stats()
    resumed = batch(sandbox, source, output, config, 2 * all_tokens)
    resent = sandbox.stats()["attempts"]
    total, _, _, final_ids = read_spend(output)
    once = sorted(final_ids) == sorted(f"req-{i}" for i in range(lines))

    row = Row(bench=NAME, key=key, client="cometkit batch", calls=lines, threads=CONCURRENCY,
              ok=sent, failed=0, wall_s=stopped.wall_s, cpu_s=stopped.cpu_s,
              rss_mb=stopped.maxrss_kb / 1024, budget_tokens=budget, **counts)
    row.info.update(case=case, all_tokens=all_tokens, spent=spent, largest_line=largest,
                    exit=stopped.returncode, left=lines - sent, order_kept=order_kept,
                    resume_exit=resumed.returncode, resent=resent, total_lines=total,
                    each_once=once)
    log(f"[{NAME}] {case}: budget {budget:,} of {all_tokens:,} tokens, spent {spent:,}, "
        f"{sent} lines sent, {lines - sent} left; resume sent {resent}")
    return row


def run(quick: bool, log: Callable[[str], Any]) -> Suite:
    lines = 200 if quick else 1000
    suite = Suite()
    with SandboxProcess(latency_s=0.02) as sandbox, tempfile.TemporaryDirectory() as tmp:
        for key, case, max_tokens in CASES:
            suite.rows.append(run_case(sandbox, Path(tmp), key, case, max_tokens, lines, log))
    _checks(suite)
    return suite


def _checks(suite: Suite) -> None:
    for row in suite.rows:
        info, budget = row.info, row.budget_tokens
        assert budget is not None
        case = info["case"]
        suite.check(f"{case}: the run ends with exit status 3", f"exit {info['exit']}",
                    info["exit"] == EXIT_BUDGET)
        allowed = budget if row.key == "max-tokens" else budget + WINDOW * info["largest_line"]
        bound = ("the budget" if row.key == "max-tokens"
                 else f"the budget + {WINDOW} calls in flight x the largest line")
        suite.check(f"{case}: spent <= {bound} ({allowed:,})",
                    f"{info['spent']:,} of {budget:,}", info["spent"] <= allowed)
        suite.check(f"{case}: every request sent was written, the first lines only",
                    f"{row.attempts} attempts, {row.ok} lines, in order: {info['order_kept']}",
                    row.attempts == row.ok and info["order_kept"])
        suite.check(f"{case}: a rerun with a higher budget sends exactly the rest",
                    f"exit {info['resume_exit']}, {info['resent']} sent for {info['left']} "
                    f"left, each line once: {info['each_once']}",
                    info["resume_exit"] == 0 and info["resent"] == info["left"]
                    and info["each_once"])
