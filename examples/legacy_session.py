"""Legacy code that already speaks ``requests``: mount CometAdapter, keep session.post(...).

    cometkit sandbox --port 8000 &
    COMETAPI_BASE_URL=http://127.0.0.1:8000/v1 COMETAPI_KEY=sandbox \
        python examples/legacy_session.py
"""

from __future__ import annotations

import os
import threading

import requests

from cometkit.adapters import CometAdapter

BASE_URL = os.environ.get("COMETAPI_BASE_URL", "https://api.cometapi.com/v1").rstrip("/")
KEY = os.environ.get("COMETAPI_KEY", "")


def existing_code(session: requests.Session, prompt: str) -> str:
    """Unchanged legacy code: a plain session.post and a status check."""
    response = session.post(
        f"{BASE_URL}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def main() -> None:
    session = requests.Session()
    # The one new line: limiter, retries and metrics for every call through this session.
    adapter = CometAdapter.from_config({"concurrency": 4}, base_url=BASE_URL)
    session.mount(BASE_URL.split("/v1")[0] + "/", adapter)

    answers: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        text = existing_code(session, f"question {i}")
        with lock:
            answers.append(text)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    adapter.close()
    print(f"{len(answers)} answers; stats: {adapter.client.stats}")


if __name__ == "__main__":
    main()
