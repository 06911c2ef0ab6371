"""A first call, a stream, and many calls on the worker pool.

Run against the built-in sandbox (no key, no internet):

    cometkit sandbox --port 8000 &
    COMETAPI_BASE_URL=http://127.0.0.1:8000/v1 COMETAPI_KEY=sandbox \
        python examples/quickstart.py

or against CometAPI with only ``COMETAPI_KEY`` set.
"""

from __future__ import annotations

import os

import cometkit

MODEL = os.environ.get("COMETKIT_EXAMPLE_MODEL", "gpt-4o-mini")


def main() -> None:
    with cometkit.Client() as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}]
        )
        print("one call:", completion.choices[0].message.content,
              f"({completion.usage.total_tokens} tokens)")

        with client.chat.completions.create(
            model=MODEL, stream=True, messages=[{"role": "user", "content": "Count to five."}]
        ) as stream:
            text = "".join(chunk.choices[0].delta.content or ""
                           for chunk in stream if chunk.choices)
        print("streamed:", text)

        prompts = [f"Write a title for story {i}." for i in range(20)]

        def ask(prompt: str) -> str:
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}])
            return answer.choices[0].message.content

        answers = list(client.map(ask, prompts, return_exceptions=True))
        failed = [a for a in answers if isinstance(a, Exception)]
        print(f"pool: {len(answers) - len(failed)} answers, {len(failed)} failed")
        print("stats:", client.stats)


if __name__ == "__main__":
    main()
