"""Code written for the openai SDK keeps its calls; cometkit limits, retries and records them.

    cometkit sandbox --port 8000 --rps 5 &
    COMETAPI_BASE_URL=http://127.0.0.1:8000/v1 COMETAPI_KEY=sandbox \
        python examples/openai_sdk.py
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai

import cometkit


def existing_code(sdk: openai.OpenAI, prompt: str) -> str:
    """Unchanged SDK code: it gets cometkit's limiter, retries and metrics underneath."""
    completion = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    return completion.choices[0].message.content or ""


def main() -> None:
    with cometkit.Client(concurrency=4) as client:
        # The one new line: an openai.OpenAI whose requests are cometkit calls (its own
        # retries off: cometkit's backoff retries, once).
        sdk = client.openai()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: existing_code(sdk, f"question {i}"), range(20)))
        # A stream holds its limiter slot until it is read to the end (or closed).
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream this."}],
            stream=True, stream_options={"include_usage": True})
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream
                       if chunk.choices)
        sdk.close()
        print(f"{len(answers)} answers, stream: {text}; stats: {client.stats}")


if __name__ == "__main__":
    main()
