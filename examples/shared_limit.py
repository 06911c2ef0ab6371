"""Several worker processes, one limit: the ``redis_limiter`` plugin at work.

    pip install 'cometkit[redis]'
    python examples/shared_limit.py --redis-url redis://127.0.0.1:6379/0

It starts the sandbox (a local stand-in for CometAPI, 100 ms per answer) unless ``--base-url``
names a server, then ``--workers`` processes of ``--threads`` threads each. Every worker builds
its client with the same configuration, as a gunicorn or Celery worker would::

    plugins:
      redis_limiter:
        url: ${REDIS_URL}
        max_concurrency: 6          # for the whole fleet, not per process
        requests_per_minute: null   # or the account's limit

and all of them together never have more than ``max_concurrency`` requests in flight: the
sandbox counts what it served at once. ``--json`` prints the numbers as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

import cometkit

#: All workers use one key: the limit is shared by the clients of one API key.
API_KEY = os.environ.get("COMETAPI_KEY", "sk-shared-limit-example")


def worker(spec: dict) -> dict:
    """One process: a client with the shared limiter, ``calls`` chat calls over ``threads``."""
    config = {"plugins": {"redis_limiter": spec["limiter"]}}
    messages = [{"role": "user", "content": "hello"}]
    with cometkit.Client(API_KEY, spec["base_url"], concurrency=spec["threads"],
                         config=config) as client:
        start = time.time()
        results = list(client.map(
            lambda _: client.chat.completions.create(model="gpt-4o-mini", messages=messages),
            range(spec["calls"]), return_exceptions=True))
        end = time.time()
    failed = [r for r in results if isinstance(r, BaseException)]
    return {"ok": len(results) - len(failed), "failed": len(failed), "start": start, "end": end,
            "errors": sorted({f"{type(e).__name__}: {e}" for e in failed})[:3]}


def run_fleet(args: argparse.Namespace, base_url: str) -> list[dict]:
    """Start the workers (this file with ``--worker``) and collect what each one did."""
    spec = {
        "base_url": base_url, "threads": args.threads, "calls": args.calls,
        "limiter": {"url": args.redis_url, "max_concurrency": args.max_concurrency,
                    "requests_per_minute": args.requests_per_minute},
    }
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                stdout=subprocess.PIPE, text=True)
               for _ in range(args.workers)]
    reports = []
    for process in workers:
        out, _ = process.communicate(timeout=args.timeout)
        if process.returncode != 0:
            raise SystemExit(f"a worker failed with exit code {process.returncode}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                        help="Redis shared by the workers (default: $REDIS_URL, else "
                             "redis://127.0.0.1:6379/0)")
    parser.add_argument("--base-url", help="API base URL (default: start a sandbox)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8, help="threads per worker")
    parser.add_argument("--calls", type=int, default=30, help="calls per worker")
    parser.add_argument("--max-concurrency", type=int, default=6,
                        help="requests in flight at once, all workers together")
    parser.add_argument("--requests-per-minute", type=float, default=None)
    parser.add_argument("--latency", type=float, default=0.1,
                        help="the sandbox's answer time, seconds")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a worker may take")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    sandbox: Any = None
    base_url = args.base_url
    if base_url is None:
        from cometkit.sandbox import SandboxProcess

        sandbox = SandboxProcess(latency_s=args.latency).start()
        base_url = sandbox.base_url
    try:
        reports = run_fleet(args, base_url)
        seen = sandbox.stats() if sandbox is not None else None
    finally:
        if sandbox is not None:
            sandbox.stop()
    ok = sum(r["ok"] for r in reports)
    elapsed = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    summary = {
        "workers": args.workers, "threads": args.threads, "calls": ok + sum(
            r["failed"] for r in reports), "ok": ok, "failed": sum(r["failed"] for r in reports),
        "elapsed_s": round(elapsed, 3), "calls_per_s": round(ok / elapsed, 2) if elapsed else None,
        "max_concurrency": args.max_concurrency,
        "max_in_flight_seen": seen["max_in_flight_seen"] if seen else None,
        "status_429": seen["attempts_by_status"].get(429, 0) if seen else None,
        "errors": sorted({e for r in reports for e in r["errors"]}),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['workers']} workers x {summary['threads']} threads: {ok} of "
              f"{summary['calls']} calls ok in {elapsed:.2f} s ({summary['calls_per_s']}/s)")
        if seen is not None:
            print(f"the server saw at most {summary['max_in_flight_seen']} requests at once "
                  f"(max_concurrency: {args.max_concurrency}), {summary['status_429']} 429s")
        for error in summary["errors"]:
            print(f"error: {error}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
