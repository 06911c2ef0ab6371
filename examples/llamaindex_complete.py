"""LlamaIndex's OpenAI LLM sends through cometkit: limited, retried and recorded.

    cometkit sandbox --port 8000 &
    COMETAPI_BASE_URL=http://127.0.0.1:8000/v1 COMETAPI_KEY=sandbox \
        python examples/llamaindex_complete.py
"""

from __future__ import annotations

import os

from llama_index.llms.openai import OpenAI

import cometkit


def main() -> None:
    with cometkit.Client() as client:
        llm = OpenAI(model="gpt-4o-mini", api_key=os.environ["COMETAPI_KEY"],
                     api_base=client.base_url, max_retries=0,  # cometkit retries
                     http_client=client.httpx_client())
        print(f"complete: {llm.complete('Say hello.').text}")
        print(f"calls through cometkit: {client.stats['calls']}")


if __name__ == "__main__":
    main()
