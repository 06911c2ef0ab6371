"""Running measured child processes, and what one measured run produced.

Every measured program runs in a child process of its own: a contender
(``python -m benchmarks.worker``) or the ``cometkit batch`` command. Children are reaped with
``os.wait4``, which hands back that one child's own resource usage (peak RSS, CPU) -- unlike
``getrusage(RUSAGE_CHILDREN)``, which mixes in every child reaped before. Every wait is bounded
by a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from cometkit.sandbox import SandboxProcess

from .contenders import CONTENDERS, Spec

__all__ = ["BenchmarkError", "BenchmarkTimeout", "Check", "ChildResult", "Row", "Suite",
           "measure", "run_child"]

#: The directory holding the ``benchmarks`` package: children need it on their path.
REPO_ROOT = Path(__file__).resolve().parents[1]
_POLL_S = 0.02


class BenchmarkError(RuntimeError):
    """A measured program failed; the message holds the end of its stderr."""


class BenchmarkTimeout(BenchmarkError):
    """A measured program outlived its time cap and was killed."""

    def __init__(self, message: str, timeout_s: float) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s


@dataclass
class Row:
    """One line of the results table."""

    bench: str
    #: Stable name, used by the target checks (``cometkit-defaults``...).
    key: str
    client: str
    calls: int
    threads: int
    ok: int
    failed: int
    wall_s: float
    errors: dict = field(default_factory=dict)
    cpu_s: Optional[float] = None
    #: The kernel's share of ``cpu_s`` (system calls, thread wake-ups).
    system_s: Optional[float] = None
    rss_mb: Optional[float] = None
    #: Server-side counts (the sandbox's), measured calls only.
    attempts: Optional[int] = None
    rate_limited: Optional[int] = None
    connections: Optional[int] = None
    max_in_flight: Optional[int] = None
    faults: dict = field(default_factory=dict)
    #: Wall time a perfect client would need, when there is such a bound.
    ideal_wall_s: Optional[float] = None
    #: The raw ``requests.Session`` row other rows of the benchmark are compared with.
    baseline: bool = False
    info: dict = field(default_factory=dict)
    #: The limit shape of a "share of the limit achieved" row (those have a table of their
    #: own); ``None`` for every other benchmark.
    shape: Optional[str] = None
    #: Set when the run was killed at this time cap: its counts are not known.
    timed_out_s: Optional[float] = None
    #: The calls' deadline of a "deadline bound" row (those have a table of their own);
    #: ``None`` for every other benchmark.
    deadline_s: Optional[float] = None
    #: The token budget of a "batch budget" row (those have a table of their own); ``None``
    #: for every other benchmark.
    budget_tokens: Optional[int] = None
    #: The case of a "priority lanes" row (those have a table of their own); ``None`` for
    #: every other benchmark.
    priority_case: Optional[str] = None

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def cpu_ms_per_call(self) -> Optional[float]:
        return None if self.cpu_s is None or not self.calls else self.cpu_s / self.calls * 1e3

    @property
    def vs_ideal(self) -> Optional[float]:
        return self.wall_s / self.ideal_wall_s if self.ideal_wall_s else None


@dataclass
class Check:
    """A target of the issue and whether this run met it (``passed=None``: for information)."""

    bench: str
    target: str
    measured: str
    passed: Optional[bool]


@dataclass
class Suite:
    """What one benchmark produced."""

    rows: list = field(default_factory=list)
    checks: list = field(default_factory=list)

    def row(self, key: str) -> Row:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(key)

    def check(self, target: str, measured: str, passed: Optional[bool]) -> None:
        bench = self.rows[0].bench if self.rows else ""
        self.checks.append(Check(bench, target, measured, passed))

    def check_connections(self, allowance: Callable[[Row], int] = lambda row: 0,
                          why: str = "") -> None:
        """cometkit's rows: TCP connections accepted <= concurrency (+ ``allowance``)."""
        rows = [row for row in self.rows if row.client.startswith("cometkit")
                and row.connections is not None]
        if not rows:
            return
        measured = "; ".join(f"{row.connections} for {row.threads} threads"
                             + (f" + {allowance(row)}" if allowance(row) else "") for row in rows)
        self.check(f"cometkit: connections accepted <= concurrency{why}", measured,
                   all(row.connections <= row.threads + allowance(row) for row in rows))


@dataclass
class ChildResult:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    maxrss_kb: int


def child_env(extra: Optional[dict] = None) -> dict:
    """The environment of a measured child: ours, the repository on the path, ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def run_child(argv: list, *, env: dict, timeout_s: float) -> ChildResult:
    """Run ``argv`` to its end (killed after ``timeout_s``) with its own resource usage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
        ])
        deadline = started + timeout_s
        killed = False
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() > deadline:
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status, usage = os.wait4(pid, 0)
                break
            time.sleep(_POLL_S)
        wall_s = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if killed:
        raise BenchmarkTimeout(f"{argv[2:4]} did not finish within {timeout_s:.0f} s", timeout_s)
    returncode = os.waitstatus_to_exitcode(status)
    return ChildResult(returncode, stdout, stderr, wall_s, usage.ru_utime + usage.ru_stime,
                       usage.ru_maxrss)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_worker(spec: Spec, *, env: Optional[dict] = None, timeout_s: float = 300.0) -> dict:
    """Run one contender in a worker process; its JSON result."""
    argv = [sys.executable, "-m", "benchmarks.worker", json.dumps(asdict(spec))]
    child = run_child(argv, env=child_env(env), timeout_s=timeout_s)
    if child.returncode != 0:
        raise BenchmarkError(f"worker for {spec.client} exited with {child.returncode}:\n"
                             f"{tail(child.stderr)}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def server_counts(stats: dict, warmup: int) -> dict:
    """The sandbox's counters as Row fields, without the warm-up calls.

    ``connections_accepted`` includes the connection that fetched the stats themselves.
    """
    by_status = stats["attempts_by_status"]
    return {
        "attempts": stats["attempts"] - warmup,
        "rate_limited": by_status.get(429, 0),
        "connections": stats["connections_accepted"] - 1,
        "max_in_flight": stats["max_in_flight_seen"],
        "faults": stats["faults_injected"],
    }


def measure(sandbox: SandboxProcess, bench: str, key: str, spec: Spec, *,
            label: Optional[str] = None, env: Optional[dict] = None,
            ideal_wall_s: Optional[float] = None, baseline: bool = False,
            timeout_s: float = 300.0, log: Callable[[str], Any] = print) -> Row:
    """Run ``spec`` against ``sandbox`` (its counters reset first) and make a row of it."""
    sandbox.reset_stats()
    result = run_worker(spec, env=env, timeout_s=timeout_s)
    row = Row(
        bench=bench, key=key, client=label or CONTENDERS[spec.client][1], calls=spec.calls,
        threads=spec.threads, ok=result["ok"], failed=result["failed"],
        wall_s=result["wall_s"], errors=result["errors"], cpu_s=result["cpu_s"],
        system_s=result["system_s"], rss_mb=result["maxrss_kb"] / 1024,
        ideal_wall_s=ideal_wall_s, baseline=baseline,
        info={**result["info"], "started_at": result["started_at"]},
        **server_counts(sandbox.stats(), result["warmup"]),
    )
    failures = (f", failed {row.failed} {_errors(row.errors)}" if row.failed else "")
    log(f"[{bench}] {row.client}: {row.calls} calls in {row.wall_s:.2f} s{failures}")
    return row


def _errors(errors: dict) -> str:
    return "(" + ", ".join(f"{name} {count}" for name, count in sorted(errors.items())) + ")"
