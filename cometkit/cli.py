"""The ``cometkit`` command: ``batch``, ``report``, ``sandbox``, ``plugins``, ``config check``.

This module is the only part of cometkit that writes to the terminal. Exit codes: 0 success,
1 some requests of a batch failed, 2 usage, configuration or input errors (nothing was sent),
3 a batch reached its budget (the rest was not sent), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import shlex
import signal
import sys
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

from ._exceptions import CometError, ConfigError, PluginError
from ._plugins import PluginInfo, configure_plugins, enabled_names, inspect_plugins
from ._transport import DEFAULT_BASE_URL, check_base_url
from ._version import __version__
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
from .config import REDACTED, dump_yaml, load_config, parse_deadline, redact
from .prices import PriceTable, format_usd

__all__ = ["main", "build_parser"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUDGET = 3
EXIT_INTERRUPTED = 130

#: What ``cometkit batch`` turns on unless the configuration sets ``stdout_metrics`` itself:
#: the per-model table at the end, on stderr, without a line per attempt.
BATCH_STDOUT_METRICS = {"summary": True, "per_attempt": False, "stream": "stderr"}
#: The API key the client sends to the built-in sandbox (never the user's real key).
SANDBOX_API_KEY = "sk-cometkit-sandbox"
#: The sandbox ``--sandbox`` starts: a provider with a modest per-model rate limit, so that a
#: first run shows the limiter and the 429 handling at work, and answers after 50 ms.
SANDBOX_SETTINGS = {"rpm": 1200, "latency_s": 0.05, "seed": 0}

_log_handler: Optional[logging.Handler] = None


def _say(text: str) -> None:
    """One message on stderr (status, errors): stdout is kept for a command's product."""
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def _error(text: str) -> int:
    _say(f"cometkit: error: {text}")
    return EXIT_USAGE


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _usd(text: str) -> float:
    """A ``--max-cost`` value: US dollars > 0 (``5``, ``0.50``, ``$5``)."""
    try:
        value = float(text.strip().lstrip("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an amount of US dollars such as 5 or "
                                         f"0.50, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 US dollars, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A ``--deadline`` value: the configuration's ``deadline`` forms (``20``, ``"1m30s"``)."""
    try:
        return parse_deadline(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -------------------------------------------------------------------------------------------
# cometkit batch
# -------------------------------------------------------------------------------------------


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
        _say(f"cometkit batch: cut a torn last line ({plan.truncated_bytes} bytes) left in "
             f"{output} by an interrupted run; that request is sent again")
    if plan.retrying:
        _say(f"cometkit batch: --retry-failed: removed {plan.retrying} failed line(s) from "
             f"{output}; sending them again")
    answered = plan.done_ok + plan.done_failed
    if answered:
        failed = (f" ({plan.done_failed} failed; add --retry-failed to send those again)"
                  if plan.done_failed else "")
        _say(f"cometkit batch: resuming: {answered} of {plan.total} requests already answered "
             f"in {output}{failed}")


def _final_line(result: BatchResult, output: str) -> str:
    earlier = result.plan.done_ok + result.plan.done_failed
    note = f" ({earlier} from earlier runs)" if earlier else ""
    return f"{result.total_ok} ok, {result.total_failed} failed{note}; output: {output}"


def _cmd_batch(args: argparse.Namespace) -> int:
    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        return _error(str(exc))
    if not args.sandbox and not (loaded.data.get("api_key") or os.environ.get("COMETAPI_KEY")):
        return _error(
            "no API key. Set it in the environment:  export COMETAPI_KEY=sk-...  (or write "
            "api_key: ${COMETAPI_KEY} in the --config file), or add --sandbox to run against "
            "the built-in sandbox, offline and without a key.")
    plugins = _batch_plugins(loaded.data.get("plugins") or {}, args.metrics_csv)

    try:
        runner = BatchRunner(args.input, args.output, model=args.model,
                             retry_failed=args.retry_failed, priority=args.priority)
    except ValueError as exc:  # --model ""
        return _error(f"--model: {exc}")
    try:
        plan = runner.prepare()
        budget = _budget(args, loaded, runner)
    except (BatchInputError, BatchOutputError, BatchFileError, ConfigError) as exc:
        runner.close()
        return _error(str(exc))
    with runner, contextlib.ExitStack() as stack:
        _describe_plan(plan, args.output)
        if plan.pending == 0:
            result = BatchResult(plan)
            _say(f"cometkit batch: nothing to send: {_final_line(result, args.output)}")
            return EXIT_FAILED if result.total_failed else EXIT_OK
        api_key = base_url = None
        if args.sandbox:
            from .sandbox import Sandbox

            sandbox = stack.enter_context(Sandbox(**SANDBOX_SETTINGS))
            base_url, api_key = sandbox.base_url, SANDBOX_API_KEY
            _say(f"cometkit batch: --sandbox: using the built-in sandbox at {base_url} "
                 f"({sandbox.describe()}). Answers are simulated on this machine; nothing "
                 "leaves it and no API key is used.")
        try:
            from . import Client

            client = Client(api_key, base_url, config=args.config,
                            concurrency=args.concurrency, deadline=args.deadline,
                            plugins=plugins)
        except (ConfigError, PluginError) as exc:
            return _error(str(exc))
        try:
            runner.lane(client)
        except ConfigError as exc:
            client.close()
            return _error(f"--priority: {exc}")
        try:
            result = _send(runner, client, plan, args, budget)
        except BatchRunError as exc:  # stopped at once: one line says why and what to do
            _say(f"cometkit batch: error: {exc}")
            return EXIT_FAILED
    _say(f"cometkit batch: {_final_line(result, args.output)}")
    if result.budget_reached and budget is not None:
        _say(_budget_message(budget, result, args))
        return EXIT_BUDGET
    if result.interrupted:
        _say(f"Interrupted. To resume, run the same command again:\n  "
             f"{_resume_command(args.argv)}")
        return EXIT_INTERRUPTED
    if result.total_failed:
        _say("Some requests failed: their errors are in the output. Rerun with --retry-failed "
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


# -------------------------------------------------------------------------------------------
# cometkit report
# -------------------------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> int:
    from .summary import Summary

    if args.plot:
        from ._plot import MissingMatplotlib, require_matplotlib

        try:
            require_matplotlib()
        except MissingMatplotlib as exc:
            return _error(str(exc))
    try:
        prices = PriceTable(load_config(args.config).data.get("prices"))
    except ConfigError as exc:
        return _error(str(exc))
    series = None
    if args.plot:
        from ._plot import Series

        series = Series()
    try:  # one read of the file, for the table and the plot
        summary = Summary.from_csv(args.csv, prices=prices,
                                   also=None if series is None else series.add)
    except FileNotFoundError:
        return _error(f"{args.csv}: no such file")
    except OSError as exc:
        return _error(f"{args.csv}: cannot read it: {exc.strerror or exc}")
    except ValueError as exc:  # names the file and line itself
        return _error(str(exc))
    if args.json:
        import json

        sys.stdout.write(json.dumps(summary.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(summary.format_table())
    sys.stdout.flush()
    if summary.skipped_rows:
        _say(f"cometkit report: {summary.skipped_rows} unreadable row(s) skipped (a run cut "
             "short leaves one)")
    if series is not None:
        from ._plot import plot_metrics

        try:
            plot_metrics(series, args.plot, source=args.csv)
        except (OSError, ValueError, csv.Error) as exc:
            return _error(f"cannot write the plot {args.plot}: {exc}")
        _say(f"cometkit report: plot written to {args.plot}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------
# cometkit plugins / config check
# -------------------------------------------------------------------------------------------


def _plugin_section(config: Optional[str]) -> tuple[dict, Any]:
    loaded = load_config(config)
    return dict(loaded.data.get("plugins") or {}), loaded


def _check_plugins(infos: list[PluginInfo], section: dict, where: str) -> dict[str, Any]:
    """Each plugin's effective section (validated options, or ``False`` when off), checked
    exactly as a client checks it, but without building anything (no file is opened)."""
    enabled = configure_plugins(infos, section, where)
    return {info.name: enabled.get(info.name, False) for info in infos if info.error is None}


def _cmd_config_check(args: argparse.Namespace) -> int:
    try:
        section, loaded = _plugin_section(args.file)
        where = loaded.where
        infos = inspect_plugins(section)
        plugins = _check_plugins(infos, section, where)
        data = dict(loaded.data)
        data["base_url"] = check_base_url(
            data.get("base_url") or os.environ.get("COMETAPI_BASE_URL") or DEFAULT_BASE_URL,
            allow_insecure_http=bool(data.get("allow_insecure_http")), where=where)
        if data.get("api_key") is None and os.environ.get("COMETAPI_KEY"):
            data["api_key"] = REDACTED  # from $COMETAPI_KEY: set, and never shown
        data["plugins"] = plugins
    except (ConfigError, PluginError) as exc:
        _say(f"cometkit config check: {exc}")
        return EXIT_USAGE
    schemas = {info.name: info.spec.options for info in infos}
    shown = redact(data, plugin_schemas=schemas)
    sys.stdout.write(f"# effective configuration of {where} (secrets shown as {REDACTED})\n")
    sys.stdout.write(dump_yaml(shown))
    sys.stdout.flush()
    _say(f"cometkit config check: {where}: OK")
    return EXIT_OK


def _enabled_label(info: PluginInfo, section: dict, enabled: set) -> str:
    if info.error is not None:
        return "broken"
    state = "yes" if info.name in enabled else "no"
    return f"{state} (config)" if info.name in section else f"{state} (default)"


def _cmd_plugins(args: argparse.Namespace) -> int:
    try:
        section, loaded = _plugin_section(args.config)
        infos = inspect_plugins(section)
    except (ConfigError, PluginError) as exc:
        return _error(str(exc))
    enabled = set(enabled_names([i for i in infos if i.error is None], section))
    rows = [("NAME", "ENABLED", "PACKAGE", "MODULE", "HOOKS")]
    for info in sorted(infos, key=lambda i: (not i.first_party, i.name)):
        package = (f"{info.distribution} {info.version or ''}".strip() if info.distribution
                   else "(module path in config)")
        hooks = ", ".join(h.replace("cometkit_", "") for h in info.hooks) or "-"
        rows.append((info.name, _enabled_label(info, section, enabled), package, info.module,
                     hooks))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [f"{cell:<{width}}" for cell, width in zip(row, widths)]
        sys.stdout.write("  ".join(cells + [row[-1]]).rstrip() + "\n")
    notes = [(info.name, info.spec.summary) for info in infos if info.spec.summary]
    if notes:
        sys.stdout.write("\n")
        for name, text in sorted(notes):
            sys.stdout.write(f"{name}: {text}\n")
    for info in infos:
        if info.error is not None:
            sys.stdout.write(f"\n{info.name}: failed to import: {info.error}\n")
    sys.stdout.write(f"\nconfiguration: {loaded.path or 'none (defaults)'}\n")
    sys.stdout.flush()
    return EXIT_OK


# -------------------------------------------------------------------------------------------
# cometkit sandbox
# -------------------------------------------------------------------------------------------


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox.cli import run

    return int(run(args))


# -------------------------------------------------------------------------------------------
# the parser
# -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cometkit",
        description="A thread-pool client for CometAPI: resumable batches, a local sandbox, "
                    "metrics reports.")
    parser.add_argument("--version", action="version", version=f"cometkit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more on stderr (-v: info, -vv: debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

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
    batch.set_defaults(handler=_cmd_batch)

    report = commands.add_parser(
        "report", help="per-model table (and plot) from a metrics CSV",
        description="Summarise a metrics CSV written by the csv_metrics plugin.")
    report.add_argument("csv", metavar="METRICS.csv")
    report.add_argument("--plot", metavar="PNG",
                        help="also draw calls/s, 429s, latency and concurrency over time "
                             "(needs the 'plot' extra: pip install 'cometkit[plot]')")
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    report.add_argument("--config", metavar="FILE",
                        help="YAML configuration whose prices: give each model's cost "
                             "(default: $COMETKIT_CONFIG)")
    report.set_defaults(handler=_cmd_report)

    from .sandbox.cli import add_arguments as add_sandbox_arguments

    sandbox = commands.add_parser(
        "sandbox", help="serve the built-in OpenAI-compatible sandbox on 127.0.0.1",
        description="A rate-limited, fault-injecting CometAPI stand-in for offline tests.")
    add_sandbox_arguments(sandbox)
    sandbox.set_defaults(handler=_cmd_sandbox)

    plugins = commands.add_parser(
        "plugins", help="list installed plugins and whether the configuration enables them")
    plugins.add_argument("--config", metavar="FILE",
                         help="YAML configuration (default: $COMETKIT_CONFIG)")
    plugins.set_defaults(handler=_cmd_plugins)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    config_commands.required = True
    check = config_commands.add_parser(
        "check", help="validate a configuration file and print it with secrets redacted")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_cmd_config_check)
    return parser


def _configure_logging(verbosity: int) -> None:
    global _log_handler
    logger = logging.getLogger("cometkit")
    if _log_handler is None:
        _log_handler = logging.StreamHandler()  # sys.stderr at the time of each write
        _log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(_log_handler)
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 \
        else logging.DEBUG
    logger.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``cometkit`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.argv = argv
    _configure_logging(args.verbose)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        _say("cometkit: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `cometkit report x.csv | head`: stop quietly
        with contextlib.suppress(OSError, ValueError):  # no traceback from the exit flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except CometError as exc:
        return _error(str(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
