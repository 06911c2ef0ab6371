"""Memory of ``cometkit batch``: peak RSS over a small and a ten times larger input.

The command runs as it would for a user (``python -m cometkit batch IN -o OUT --config CFG``)
against a sandbox process with no latency and no limits. Its peak RSS is the kernel's
high-water mark for that one process (``wait4``). Flat memory means the larger run peaks no
higher than the smaller one, give or take allocator noise.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from cometkit.sandbox import SandboxProcess

from .contenders import MODEL, expected_answer, prompt
from .runner import BenchmarkError, Row, Suite, child_env, run_child, server_counts, tail

NAME = "memory"
TITLE = "Memory of cometkit batch (peak RSS)"

CONCURRENCY = 8
MAX_GROWTH = 1.1
MAX_RSS_MB = 150.0
#: Generous: the larger full run takes about three minutes on a 2-core machine.
TIMEOUT_S = 900.0


def write_input(path: Path, lines: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(lines):
            out.write(json.dumps({"custom_id": f"req-{i}", "prompt": prompt(i),
                                  "model": MODEL}) + "\n")


def count_answers(path: Path) -> tuple:
    """``(ok, failed)`` lines of a batch output; an ok line carries the expected echo."""
    ok = failed = 0
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            i = int(record["custom_id"].rpartition("-")[2])
            body = (record.get("response") or {}).get("body") or {}
            choices = body.get("choices") or [{}]
            good = (record.get("error") is None
                    and choices[0].get("message", {}).get("content") == expected_answer(i))
            if good:
                ok += 1
            else:
                failed += 1
    return ok, failed


def run_batch(sandbox: SandboxProcess, tmp: Path, lines: int, log: Callable[[str], Any]) -> Row:
    source, output, config = tmp / f"in-{lines}.jsonl", tmp / f"out-{lines}.jsonl", tmp / "c.yaml"
    write_input(source, lines)
    config.write_text(f"base_url: {sandbox.base_url}\napi_key: sk-benchmark\n")
    sandbox.reset_stats()
    argv = [sys.executable, "-m", "cometkit", "batch", str(source), "-o", str(output),
            "--config", str(config), "--concurrency", str(CONCURRENCY), "--no-progress"]
    child = run_child(argv, env=child_env(), timeout_s=TIMEOUT_S)
    if child.returncode not in (0, 1):
        raise BenchmarkError(f"cometkit batch exited with {child.returncode}:\n"
                             f"{tail(child.stderr)}")
    ok, failed = count_answers(output)
    source.unlink()
    output.unlink()
    row = Row(bench=NAME, key=f"batch-{lines}", client=f"cometkit batch, {lines:,} lines",
              calls=lines, threads=CONCURRENCY, ok=ok, failed=lines - ok, wall_s=child.wall_s,
              cpu_s=child.cpu_s, rss_mb=child.maxrss_kb / 1024,
              errors={"bad output line": failed} if failed else {},
              **server_counts(sandbox.stats(), warmup=0))
    log(f"[{NAME}] {row.client}: {row.wall_s:.1f} s, peak RSS {row.rss_mb:.1f} MB")
    return row


def run(quick: bool, log: Callable[[str], Any]) -> Suite:
    small, large = (2_000, 20_000) if quick else (20_000, 200_000)
    suite = Suite()
    with SandboxProcess() as sandbox, tempfile.TemporaryDirectory() as tmp:
        for lines in (small, large):
            suite.rows.append(run_batch(sandbox, Path(tmp), lines, log))
    low, high = suite.rows
    for row in (low, high):
        suite.check(f"{row.client}: every line answered", f"{row.ok} ok, {row.failed} failed",
                    row.failed == 0)
    suite.check(f"peak RSS of {high.calls:,} lines <= {MAX_GROWTH}x that of {low.calls:,}",
                f"{high.rss_mb:.1f} MB = {high.rss_mb / low.rss_mb:.2f}x of {low.rss_mb:.1f} MB",
                high.rss_mb <= MAX_GROWTH * low.rss_mb)
    suite.check(f"peak RSS of {high.calls:,} lines <= {MAX_RSS_MB:.0f} MB",
                f"{high.rss_mb:.1f} MB", high.rss_mb <= MAX_RSS_MB)
    suite.check_connections()
    return suite
