"""One worker process of a fleet sharing a ``redis_limiter``, for tests/test_redis_limiter.py.

``python tests/redis_worker.py '<json spec>'``. The spec: ``key``, ``base_url``, ``threads``,
``calls``, ``model``, ``prompt_chars`` (the length of each prompt; default a short one),
``plugins`` (the client's ``plugins:`` section) and ``wait_for_go``
(print ``ready`` and wait for a line on stdin, so that a test starts the whole fleet at once).
Prints one JSON line: ``ok``, ``errors`` (exception type and message per failed call),
``start`` and ``end`` (wall-clock time around the calls).
"""

from __future__ import annotations

import json
import sys
import time

import cometkit


def main() -> int:
    spec = json.loads(sys.argv[1])
    messages = [{"role": "user", "content": "x" * spec["prompt_chars"]
                 if spec.get("prompt_chars") else "hi"}]
    with cometkit.Client(spec["key"], spec["base_url"], concurrency=spec["threads"],
                         config={"plugins": spec["plugins"]}) as client:
        if spec.get("wait_for_go"):
            print("ready", flush=True)
            sys.stdin.readline()
        start = time.time()
        results = list(client.map(
            lambda _: client.chat.completions.create(model=spec.get("model", "m1"),
                                                     messages=messages),
            range(spec["calls"]), return_exceptions=True))
        end = time.time()
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    print(json.dumps({"ok": len(results) - len(errors), "errors": errors, "start": start,
                      "end": end}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
