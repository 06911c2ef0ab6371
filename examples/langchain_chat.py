"""LangChain's ChatOpenAI sends through cometkit: invoke and stream, limited and retried.

    cometkit sandbox --port 8000 &
    COMETAPI_BASE_URL=http://127.0.0.1:8000/v1 COMETAPI_KEY=sandbox \
        python examples/langchain_chat.py
"""

from __future__ import annotations

import os

from langchain_openai import ChatOpenAI

import cometkit


def main() -> None:
    with cometkit.Client() as client:
        chat = ChatOpenAI(model="gpt-4o-mini", api_key=os.environ["COMETAPI_KEY"],
                          base_url=client.base_url, max_retries=0,  # cometkit retries
                          http_client=client.httpx_client())
        answer = chat.invoke("Say hello.").content
        streamed = "".join(str(chunk.content) for chunk in chat.stream("Say it slowly."))
        print(f"invoke: {answer}")
        print(f"stream: {streamed}")
        print(f"calls through cometkit: {client.stats['calls']}")


if __name__ == "__main__":
    main()
