"""``cometkit batch``: its flags, and the run of one batch file from the command line.

The work itself is :class:`cometkit.batch.BatchRunner`; this module turns the flags into a
runner, a budget and a client (the user's, or one on the built-in sandbox), shows the progress
bar, handles Ctrl-C (once: finish what is in flight; twice: abandon it), and says what
happened and how to resume in one line each, with the exit code of :mod:`cometkit.cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import signal
import sys
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

from ._cli_common import (
    EXIT_BUDGET,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    checked_value,
    error,
    say,
)
from ._exceptions import ConfigError, PluginError
from .batch import (
    BatchFileError,
    BatchInputError,
    BatchOutputError,
    BatchPlan,
    BatchResult,
    BatchRunError,
    BatchRunner,
)
from .budget import Budget
from .config import load_config, parse_deadline
from .prices import PriceTable, format_usd

__all__ = ["add_parser", "run", "BATCH_STDOUT_METRICS", "SANDBOX_API_KEY", "SANDBOX_SETTINGS"]

#: What ``cometkit batch`` turns on unless the configuration sets ``stdout_metrics`` itself:
#: the per-model table at the end, on stderr, without a line per attempt.
BATCH_STDOUT_METRICS = {"summary": True, "per_attempt": False, "stream": "stderr"}
#: The API key the client sends to the built-in sandbox (never the user's real key).
SANDBOX_API_KEY = "sk-cometkit-sandbox"
#: The sandbox ``--sandbox`` starts: a provider with a modest per-model rate limit, so that a
#: first run shows the limiter and the 429 handling at work, and answers after 50 ms.
SANDBOX_SETTINGS = {"rpm": 1200, "latency_s": 0.05, "seed": 0}


def _positive_int(text: str) -> int:
    return checked_value(text, int, f"must be a whole number, got {text!r}",
                         lambda value: None if value >= 1 else f"must be at least 1, got {value}")


def _usd(text: str) -> float:
    """A ``--max-cost`` value: US dollars > 0 (``5``, ``0.50``, ``$5``)."""
    return checked_value(
        text, lambda usd: float(usd.strip().lstrip("$")),
        f"must be an amount of US dollars such as 5 or 0.50, got {text!r}",
        lambda value: (None if math.isfinite(value) and value > 0
                       else f"must be more than 0 US dollars, got {text!r}"))


def _seconds(text: str) -> float:
    """A ``--deadline`` value: the configuration's ``deadline`` forms (``20``, ``"1m30s"``)."""
    return checked_value(text, parse_deadline)


def _batch_plugins(section: dict, metrics_csv: Optional[str]) -> dict:
    """The ``plugins`` override of a batch run, merged into the user's configuration."""
    override: dict[str, Any] = {}
    if "stdout_metrics" not in section:
        override["stdout_metrics"] = dict(BATCH_STDOUT_METRICS)
    if metrics_csv:
        current = section.get("csv_metrics")
        override["csv_metrics"] = {**(current if isinstance(current, dict) else {}),
                                   "path": metrics_csv}
    return override


def _resume_command(argv: Sequence[str]) -> str:
    return "cometkit " + shlex.join(list(argv))


class _Progress:
    """The tqdm bar of a batch run: done / failed / retries, calls per second and ETA.

    ``tqdm(disable=None)`` hides it when stderr is not a terminal.
    """

    def __init__(self, total: int, *, enabled: bool, stats: Callable[[], dict]) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="call", desc="batch", file=sys.stderr,
                         disable=None if enabled else True, dynamic_ncols=True,
                         mininterval=0.25, smoothing=0.05)
        self._stats = stats
        self.ok = 0
        self.failed = 0

    def update(self, ok: bool) -> None:
        """Called under the batch's output lock, one thread at a time."""
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        if self._bar.disable:
            return
        self._bar.set_postfix(OrderedDict(done=self.ok, failed=self.failed,
                                          retries=self._stats().get("retries", 0)),
                              refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _describe_plan(plan: BatchPlan, output: str) -> None:
    if plan.truncated_bytes:
        say(f"cometkit batch: cut a torn last line ({plan.truncated_bytes} bytes) left in "
            f"{output} by an interrupted run; that request is sent again")
    if plan.retrying:
        say(f"cometkit batch: --retry-failed: removed {plan.retrying} failed line(s) from "
            f"{output}; sending them again")
    answered = plan.done_ok + plan.done_failed
    if answered:
        failed = (f" ({plan.done_failed} failed; add --retry-failed to send those again)"
                  if plan.done_failed else "")
        say(f"cometkit batch: resuming: {answered} of {plan.total} requests already answered "
            f"in {output}{failed}")


def _final_line(result: BatchResult, output: str) -> str:
    earlier = result.plan.done_ok + result.plan.done_failed
    note = f" ({earlier} from earlier runs)" if earlier else ""
    return f"{result.total_ok} ok, {result.total_failed} failed{note}; output: {output}"


def run(args: argparse.Namespace) -> int:
    """``cometkit batch``; returns the exit code."""
    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        return error(str(exc))
    if not args.sandbox and not (loaded.data.get("api_key") or os.environ.get("COMETAPI_KEY")):
        return error(
            "no API key. Set it in the environment:  export COMETAPI_KEY=sk-...  (or write "
            "api_key: ${COMETAPI_KEY} in the --config file), or add --sandbox to run against "
            "the built-in sandbox, offline and without a key.")
    plugins = _batch_plugins(loaded.data.get("plugins") or {}, args.metrics_csv)

    try:
        runner = BatchRunner(args.input, args.output, model=args.model,
                             retry_failed=args.retry_failed, priority=args.priority)
    except ValueError as exc:  # --model ""
        return error(f"--model: {exc}")
    try:
        plan = runner.prepare()
        budget = _budget(args, loaded, runner)
    except (BatchInputError, BatchOutputError, BatchFileError, ConfigError) as exc:
        runner.close()
        return error(str(exc))
    with runner, contextlib.ExitStack() as stack:
        _describe_plan(plan, args.output)
        if plan.pending == 0:
            result = BatchResult(plan)
            say(f"cometkit batch: nothing to send: {_final_line(result, args.output)}")
            return EXIT_FAILED if result.total_failed else EXIT_OK
        api_key = base_url = None
        if args.sandbox:
            from .sandbox import Sandbox

            sandbox = stack.enter_context(Sandbox(**SANDBOX_SETTINGS))
            base_url, api_key = sandbox.base_url, SANDBOX_API_KEY
            say(f"cometkit batch: --sandbox: using the built-in sandbox at {base_url} "
                f"({sandbox.describe()}). Answers are simulated on this machine; nothing "
                "leaves it and no API key is used.")
        try:
            from . import Client

            client = Client(api_key, base_url, config=args.config,
                            concurrency=args.concurrency, deadline=args.deadline,
                            plugins=plugins)
        except (ConfigError, PluginError) as exc:
            return error(str(exc))
        try:
            runner.lane(client)
        except ConfigError as exc:
            client.close()
            return error(f"--priority: {exc}")
        try:
            result = _send(runner, client, plan, args, budget)
        except BatchRunError as exc:  # stopped at once: one line says why and what to do
            say(f"cometkit batch: error: {exc}")
            return EXIT_FAILED
    say(f"cometkit batch: {_final_line(result, args.output)}")
    if result.budget_reached and budget is not None:
        say(_budget_message(budget, result, args))
        return EXIT_BUDGET
    if result.interrupted:
        say(f"Interrupted. To resume, run the same command again:\n  "
            f"{_resume_command(args.argv)}")
        return EXIT_INTERRUPTED
    if result.total_failed:
        say("Some requests failed: their errors are in the output. Rerun with --retry-failed "
            "to send them again.")
        return EXIT_FAILED
    return EXIT_OK


def _budget(args: argparse.Namespace, loaded: Any, runner: BatchRunner) -> Optional[Budget]:
    """The ``--max-total-tokens`` / ``--max-cost`` budget, its prices checked against every
    model of the job before anything is sent (``None`` without either flag)."""
    if args.max_total_tokens is None and args.max_cost is None:
        return None
    budget = Budget(max_total_tokens=args.max_total_tokens, max_cost_usd=args.max_cost,
                    prices=PriceTable(loaded.data.get("prices")), prices_where=loaded.where)
    runner.check_budget(budget)
    return budget


def _budget_message(budget: Budget, result: BatchResult, args: argparse.Namespace) -> str:
    earlier = budget.earlier
    note = ""
    if earlier.tokens or earlier.cost_usd:
        shown = [f"{earlier.tokens:,} tokens"] + (
            [format_usd(earlier.cost_usd)] if budget.max_cost_usd is not None else [])
        note = f" ({' / '.join(shown)} of it by earlier runs)"
    flags = " / ".join(flag for flag, value in (("--max-total-tokens", args.max_total_tokens),
                                                ("--max-cost", args.max_cost))
                       if value is not None)
    return (f"cometkit batch: budget reached: spent {budget.describe()}{note}; the next "
            f"request would pass it, so {result.unanswered} of {result.plan.total} requests "
            f"were not sent. The budget covers the whole job (every run into "
            f"{args.output}). To go on, rerun with a higher {flags}:\n  "
            f"{_resume_command(args.argv)}")


def _send(runner: BatchRunner, client: Any, plan: BatchPlan, args: argparse.Namespace,
          budget: Optional[Budget] = None) -> BatchResult:
    """Run the batch with the progress bar and the Ctrl-C handling, then close the client
    (which flushes the metrics and prints the summary table)."""
    progress = _Progress(plan.pending, enabled=not args.no_progress, stats=lambda: client.stats)
    interrupts = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            runner.stop()
            # os.write: a signal handler must not re-enter a buffered stream
            os.write(2, b"\ncometkit batch: interrupted: sending no more requests, finishing "
                        b"those in flight (Ctrl-C again to abandon them)\n")
            return
        runner.abandon()
        os.write(2, (f"\ncometkit batch: abandoned the requests in flight; the answers "
                     f"written so far are in {args.output}.\nTo resume, run the same command "
                     f"again:\n  {_resume_command(args.argv)}\n").encode())
        os._exit(EXIT_INTERRUPTED)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logging.getLogger("cometkit")]):
            result = runner.run(client, on_result=progress.update, budget=budget)
    finally:
        progress.close()
        try:
            client.close()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
    return result


def add_parser(commands: Any) -> None:
    """Add ``cometkit batch`` to the subcommands ``commands`` (argparse's subparsers)."""
    batch = commands.add_parser(
        "batch", help="send a JSONL file of requests; resumable",
        description="Send every request of a JSONL file (OpenAI Batch format, or shorthand "
                    "lines with prompt/messages) and write one result line per request. "
                    "Rerun the same command to resume.")
    batch.add_argument("input", metavar="INPUT", help="JSONL file of requests")
    batch.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                       help="JSONL file of results; appended to, so a rerun resumes")
    batch.add_argument("--model", help="model for lines that name none")
    batch.add_argument("--config", metavar="FILE",
                       help="YAML configuration (default: $COMETKIT_CONFIG)")
    batch.add_argument("--concurrency", type=_positive_int, metavar="N",
                       help="requests in flight at once (the client's worker threads)")
    batch.add_argument("--deadline", type=_seconds, metavar="SECONDS",
                       help="seconds each request may take in all (waiting for admission, "
                            "attempts, retry waits); past it the line records a timeout")
    batch.add_argument("--max-total-tokens", type=_positive_int, metavar="N",
                       help="stop sending once the job's tokens (input + output, earlier "
                            "runs into OUTPUT included) would pass N; exit status 3")
    batch.add_argument("--max-cost", type=_usd, metavar="USD",
                       help="stop sending once the job's cost in US dollars would pass USD, "
                            "at the configuration's prices: (needed for every model); exit "
                            "status 3")
    batch.add_argument("--priority", metavar="NAME",
                       help="priority lane of the requests (default: batch, or the lowest "
                            "configured lane): calls of higher lanes sharing the limiter go "
                            "first")
    batch.add_argument("--metrics-csv", metavar="PATH",
                       help="write one CSV row per attempt here (csv_metrics plugin)")
    batch.add_argument("--sandbox", action="store_true",
                       help="start the built-in sandbox and send there: offline, no key")
    batch.add_argument("--retry-failed", action="store_true",
                       help="send again the requests an earlier run answered with an error")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.set_defaults(handler=run)
