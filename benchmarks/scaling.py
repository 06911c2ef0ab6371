"""Scaling with concurrency against a slow server: 100 ms per answer, no limits.

At concurrency ``c`` no client can beat ``c / latency`` calls per second. Each run sends
``c x rounds`` calls, so the ideal wall time is the same for every concurrency
(``rounds x latency``); the table's "x ideal" is the bound divided by the calls/s reached.
"""

from __future__ import annotations

from typing import Any, Callable

from cometkit.sandbox import SandboxProcess

from .contenders import Spec
from .runner import Suite, measure

NAME = "scaling"
TITLE = "Scaling (100 ms latency; calls/s vs concurrency / latency)"

LATENCY_S = 0.1
CONCURRENCY = (1, 8, 32, 64)
WARMUP = 1
#: (key prefix, contender, label or None)
CLIENTS = (("requests", "requests", None), ("cometkit", "cometkit", "cometkit (defaults)"),
           ("openai", "openai", None))


def run(quick: bool, log: Callable[[str], Any]) -> Suite:
    rounds = 8 if quick else 20
    suite = Suite()
    with SandboxProcess(latency_s=LATENCY_S) as sandbox:
        for threads in CONCURRENCY:
            for prefix, client, label in CLIENTS:
                spec = Spec(client, sandbox.base_url, threads * rounds, threads, warmup=WARMUP)
                row = measure(sandbox, NAME, f"{prefix}-{threads}", spec, label=label,
                              ideal_wall_s=rounds * LATENCY_S, baseline=prefix == "requests",
                              log=log)
                suite.rows.append(row)
    for threads in CONCURRENCY:
        row = suite.row(f"cometkit-{threads}")
        bound = threads / LATENCY_S
        suite.check(f"cometkit at concurrency {threads}: calls/s vs bound {bound:.0f}/s",
                    f"{row.calls_per_s:.1f}/s = {row.calls_per_s / bound:.0%} of the bound",
                    None)
    suite.check_connections()
    return suite
