"""Client overhead: the CPU a client spends per call when the server costs nothing.

No limits, no latency, 8 threads. The number is the client process's CPU time (user + system,
all threads) for the measured calls divided by their count; the sandbox runs in another
process, so none of its work is counted. One warm-up call per client is left out.

CPU time on a small shared machine is noisy (the kernel's share of it especially), so a full
run measures every client three times, interleaved, and keeps the run with the median CPU
per call.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

from cometkit.sandbox import SandboxProcess

from .contenders import Spec
from .runner import Suite, measure

NAME = "overhead"
TITLE = "Client overhead (CPU per call, no limits, no latency)"

THREADS = 8
WARMUP = 1

#: (key, contender, label or None, plugins section, extra environment)
RUNS = (
    ("requests", "requests", None, {}, {}),
    ("cometkit-csv", "cometkit", "cometkit (default plugins + CSV)", "csv", {}),
    ("cometkit-no-plugins", "cometkit", "cometkit (no plugins)", {},
     {"COMETKIT_LOAD_PLUGINS": ""}),
    ("requests-adapter", "requests-adapter", None, {}, {}),
    ("urllib3", "urllib3", None, {}, {}),
    ("openai", "openai", None, {}, {}),
    ("openai-cometkit", "openai-cometkit", "openai SDK through cometkit (default plugins)", {},
     {}),
)


def run(quick: bool, log: Callable[[str], Any]) -> Suite:
    calls, rounds = (1000, 1) if quick else (3000, 3)
    measured: dict = {key: [] for key, *_ in RUNS}
    with SandboxProcess() as sandbox, tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for key, client, label, plugins, env in RUNS:
                if plugins == "csv":
                    plugins = {"csv_metrics": {"path": str(Path(tmp, f"{key}-{round_}.csv"))}}
                spec = Spec(client, sandbox.base_url, calls, THREADS, warmup=WARMUP,
                            plugins=plugins)
                measured[key].append(measure(sandbox, NAME, key, spec, label=label, env=env,
                                             baseline=key == "requests", log=log))
    suite = Suite()
    for rows in measured.values():
        median = statistics.median_low(row.cpu_s for row in rows)
        suite.rows.append(next(row for row in rows if row.cpu_s == median))
        if rounds > 1:
            suite.rows[-1].info["cpu_ms_per_call_runs"] = [
                round(row.cpu_ms_per_call, 3) for row in rows]
    _checks(suite)
    return suite


def _checks(suite: Suite) -> None:
    base = suite.row("requests").cpu_ms_per_call
    sdk = suite.row("openai").cpu_ms_per_call
    csv_row, bare = suite.row("cometkit-csv"), suite.row("cometkit-no-plugins")
    for row in (csv_row, bare):
        suite.check(f"{row.client}: every call succeeds", f"{row.failed} failed",
                    row.failed == 0)
    csv_ms, bare_ms = csv_row.cpu_ms_per_call, bare.cpu_ms_per_call
    suite.check("default plugins + CSV: CPU/call <= 0.9x requests Session.post",
                f"{csv_ms:.3f} ms = {csv_ms / base:.2f}x of {base:.3f} ms", csv_ms <= 0.9 * base)
    suite.check("default plugins + CSV: CPU/call <= 0.5x openai SDK",
                f"{csv_ms:.3f} ms = {csv_ms / sdk:.2f}x of {sdk:.3f} ms", csv_ms <= 0.5 * sdk)
    suite.check("no plugins: CPU/call <= 0.75x requests Session.post",
                f"{bare_ms:.3f} ms = {bare_ms / base:.2f}x of {base:.3f} ms",
                bare_ms <= 0.75 * base)
    through = suite.row("openai-cometkit")
    through_ms = through.cpu_ms_per_call
    suite.check("openai SDK through cometkit: every call succeeds", f"{through.failed} failed",
                through.failed == 0)
    suite.check("openai SDK through cometkit: CPU/call <= 1.1x openai SDK",
                f"{through_ms:.3f} ms = {through_ms / sdk:.2f}x of {sdk:.3f} ms",
                through_ms <= 1.1 * sdk)
    if bare.info.get("plugins"):
        suite.check("no plugins: no plugin loaded", f"loaded {bare.info['plugins']}", False)
    suite.check_connections()
