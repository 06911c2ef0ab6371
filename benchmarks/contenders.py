"""The clients being compared, each sending the same workload: one chat completion per item.

Each contender is a factory ``make(spec) -> Contender``. It does its set-up (imports, building
a client or a session) before the clock starts, so that the measurement is the cost of the
calls alone. The workload is identical for all of them: ``POST /chat/completions`` for model
``gpt-4o-mini`` with one user message ``prompt <i>`` (padded to a given length where a
benchmark sets ``Spec.prompt_chars``), the answer decoded from JSON and its text checked
against the sandbox's echo (``echo: prompt <i>...``).

The peers are written the way their documentation shows them, not tuned: a plain
``requests.Session`` (whose default pool holds 10 connections), the ``openai`` SDK with its
default ``max_retries``, and the CometAPI rate-limit guide's two recipes -- a semaphore of 5
around the SDK, and a loop retrying 429 five times after ``min(30, 2**attempt) + random()``
seconds -- restated in synchronous Python.

Modules are imported inside the factories: a worker process pays only for the client it runs.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

__all__ = ["CONTENDERS", "Contender", "Spec", "MODEL", "prompt", "expected_answer"]

MODEL = "gpt-4o-mini"
#: The guide's recipes, as published.
GUIDE_SEMAPHORE = 5
GUIDE_ATTEMPTS = 5
GUIDE_MAX_DELAY_S = 30.0
#: Connect and read timeouts every client is given (the same as cometkit's defaults).
TIMEOUT_S = (10.0, 600.0)
#: What pads a prompt to the length a benchmark asks for (words, so tokenizers see words).
_FILLER = " lorem ipsum dolor sit amet"

#: What one call returns: ``None`` when it got the expected answer, else a short reason.
Outcome = Optional[str]


def prompt(i: int, chars: int = 0) -> str:
    """``prompt <i>``, padded with words to ``chars`` characters when that is longer."""
    text = f"prompt {i}"
    if chars > len(text):
        filler = _FILLER * (chars // len(_FILLER) + 1)
        text = (text + filler)[:chars]
    return text


def expected_answer(i: int, chars: int = 0) -> str:
    return f"echo: {prompt(i, chars)}"


@dataclass
class Spec:
    """What a worker process runs (sent to it as JSON)."""

    client: str
    base_url: str
    calls: int
    threads: int
    api_key: str = "sk-benchmark"
    #: Calls made one by one before the measurement (lazy imports, first connection).
    warmup: int = 0
    #: ``plugins:`` section for cometkit contenders.
    plugins: dict = field(default_factory=dict)
    #: How cometkit contenders spread the calls: ``map`` (``client.map``, in input order,
    #: a bounded window) or ``threads`` (a ThreadPoolExecutor of ``threads`` workers).
    driver: str = "map"
    #: Prompt length in characters of item ``i``: ``prompt_chars[i % len]``; empty for the
    #: short ``prompt <i>``.
    prompt_chars: list = field(default_factory=list)
    #: Wall-clock time (``time.time()``) at which the measured calls start, so that several
    #: workers start together or a run starts at a given point of a calendar window; 0: at
    #: once.
    start_at: float = 0.0
    #: cometkit contenders: the client's ``deadline`` in seconds (0: none); the longest call
    #: is then reported as ``info["max_call_s"]``.
    deadline_s: float = 0.0

    def chars(self, i: int) -> int:
        return self.prompt_chars[i % len(self.prompt_chars)] if self.prompt_chars else 0

    def messages(self, i: int) -> list:
        return [{"role": "user", "content": prompt(i, self.chars(i))}]

    def body(self, i: int) -> dict:
        return {"model": MODEL, "messages": self.messages(i)}

    def check(self, i: int, content: Any) -> Outcome:
        """``None`` when ``content`` is the sandbox's echo of item ``i``."""
        return None if content == expected_answer(i, self.chars(i)) else "WrongAnswer"


@dataclass
class Contender:
    """A ready client: ``call(i)`` sends item ``i``; ``run`` sends them all on its threads."""

    call: Callable[[int], Outcome]
    close: Callable[[], None]
    #: Runs ``call`` over the items on ``threads`` threads; defaults to a ThreadPoolExecutor.
    run: Optional[Callable[[Iterable[int]], Iterator[Any]]] = None
    #: Facts worth reporting (plugins in effect, ...).
    info: dict = field(default_factory=dict)


def _http_error(status: int) -> str:
    return f"HTTP {status}"


# -- cometkit --------------------------------------------------------------------------------


def _cometkit(spec: Spec) -> Contender:
    import cometkit

    client = cometkit.Client(spec.api_key, spec.base_url, concurrency=spec.threads,
                             timeout=list(TIMEOUT_S), plugins=spec.plugins or None,
                             deadline=spec.deadline_s or None)
    create = client.chat.completions.create
    info: dict = {"plugins": client.plugins, "driver": spec.driver}
    lock = threading.Lock()

    def answer(i: int) -> Outcome:
        reply = create(model=MODEL, messages=spec.messages(i))
        return spec.check(i, reply.choices[0].message.content)

    def timed(i: int) -> Outcome:
        started = time.perf_counter()
        try:
            return answer(i)
        finally:
            took = time.perf_counter() - started
            with lock:
                info["max_call_s"] = max(info.get("max_call_s", 0.0), took)

    call = timed if spec.deadline_s else answer

    def run(items: Iterable[int]) -> Iterator[Any]:
        return client.map(call, items, return_exceptions=True)

    return Contender(call, client.close, run if spec.driver == "map" else None, info=info)


# -- requests and urllib3 --------------------------------------------------------------------


def _requests_session(spec: Spec) -> Contender:
    import requests

    session = requests.Session()
    url = spec.base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {spec.api_key}"}

    def call(i: int) -> Outcome:
        response = session.post(url, json=spec.body(i), headers=headers, timeout=TIMEOUT_S)
        if response.status_code >= 300:
            return _http_error(response.status_code)
        return spec.check(i, response.json()["choices"][0]["message"]["content"])

    return Contender(call, session.close)


def _requests_adapter(spec: Spec) -> Contender:
    """A request prepared by ``requests`` itself, sent straight through its ``HTTPAdapter``:
    what ``Session.post`` does minus merging settings from the environment on every call."""
    import requests
    from requests.adapters import HTTPAdapter

    adapter = HTTPAdapter(pool_maxsize=max(10, spec.threads))
    url = spec.base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {spec.api_key}"}

    def call(i: int) -> Outcome:
        prepared = requests.Request("POST", url, json=spec.body(i), headers=headers).prepare()
        response = adapter.send(prepared, timeout=TIMEOUT_S)
        if response.status_code >= 300:
            return _http_error(response.status_code)
        return spec.check(i, json.loads(response.content)["choices"][0]["message"]["content"])

    return Contender(call, adapter.close)


def _urllib3(spec: Spec) -> Contender:
    import urllib3

    pool = urllib3.PoolManager(maxsize=max(10, spec.threads))
    url = spec.base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {spec.api_key}", "Content-Type": "application/json"}
    timeout = urllib3.Timeout(connect=TIMEOUT_S[0], read=TIMEOUT_S[1])

    def call(i: int) -> Outcome:
        response = pool.request("POST", url, body=json.dumps(spec.body(i)).encode(),
                                headers=headers, timeout=timeout, retries=False)
        if response.status >= 300:
            return _http_error(response.status)
        return spec.check(i, json.loads(response.data)["choices"][0]["message"]["content"])

    return Contender(call, pool.clear)


# -- the openai SDK and the guide's recipes ----------------------------------------------------


def _openai_client(spec: Spec) -> Any:
    import openai

    return openai.OpenAI(api_key=spec.api_key, base_url=spec.base_url,
                         timeout=openai.Timeout(TIMEOUT_S[1], connect=TIMEOUT_S[0]))


def _sdk_calls(spec: Spec, sdk: Any, close: Callable[[], None], **info: Any) -> Contender:
    """The workload sent through an ``openai.OpenAI`` client."""
    create = sdk.chat.completions.create

    def call(i: int) -> Outcome:
        answer = create(model=MODEL, messages=spec.messages(i))
        return spec.check(i, answer.choices[0].message.content)

    return Contender(call, close, info={"max_retries": sdk.max_retries, **info})


def _openai(spec: Spec) -> Contender:
    client = _openai_client(spec)
    return _sdk_calls(spec, client, client.close)


def _openai_through_cometkit(spec: Spec) -> Contender:
    """The SDK as ``client.openai()`` builds it: cometkit's limiter, retries and sinks under
    it (its own retries off), its connections through cometkit's pool."""
    import cometkit

    client = cometkit.Client(spec.api_key, spec.base_url, concurrency=spec.threads,
                             timeout=list(TIMEOUT_S), plugins=spec.plugins or None)
    sdk = client.openai()

    def close() -> None:
        sdk.close()
        client.close()

    return _sdk_calls(spec, sdk, close, plugins=client.plugins)


def _guide_semaphore(spec: Spec) -> Contender:
    """The guide's "limit concurrency" recipe: at most 5 SDK calls at once, whatever the
    number of threads."""
    sdk = _openai(spec)
    semaphore = threading.Semaphore(GUIDE_SEMAPHORE)

    def call(i: int) -> Outcome:
        with semaphore:
            return sdk.call(i)

    return Contender(call, sdk.close, info={**sdk.info, "semaphore": GUIDE_SEMAPHORE})


def guide_retry(send: Callable[[], Outcome], *, is_rate_limit: Callable[[BaseException], bool],
                sleep: Callable[[float], None] = time.sleep,
                draw: Callable[[], float] = random.random) -> Outcome:
    """The guide's 429 loop: up to five tries; after a 429 that is not the last try, wait
    ``min(30, 2**attempt)`` seconds plus up to one second of jitter. Anything else is raised."""
    for attempt in range(GUIDE_ATTEMPTS):
        try:
            return send()
        except Exception as exc:
            if not is_rate_limit(exc) or attempt == GUIDE_ATTEMPTS - 1:
                raise
        sleep(min(GUIDE_MAX_DELAY_S, 2.0 ** attempt) + draw())
    raise AssertionError("unreachable: the last attempt returns or raises")


def _guide_retried(inner: Contender) -> Contender:
    """``inner``'s calls wrapped in the guide's 429 loop."""
    import openai

    def is_rate_limit(exc: BaseException) -> bool:
        return isinstance(exc, openai.RateLimitError)

    def call(i: int) -> Outcome:
        return guide_retry(lambda: inner.call(i), is_rate_limit=is_rate_limit)

    return Contender(call, inner.close, info=inner.info)


def _guide_retry_loop(spec: Spec) -> Contender:
    return _guide_retried(_openai(spec))


def _guide_both(spec: Spec) -> Contender:
    """Both recipes of the guide together: the 429 loop around a semaphore-guarded call."""
    return _guide_retried(_guide_semaphore(spec))


#: Contender name -> (factory, label in the table).
CONTENDERS: dict = {
    "cometkit": (_cometkit, "cometkit"),
    "requests": (_requests_session, "requests Session.post"),
    "requests-adapter": (_requests_adapter, "requests PreparedRequest + HTTPAdapter.send"),
    "urllib3": (_urllib3, "urllib3 PoolManager"),
    "openai": (_openai, "openai SDK"),
    "openai-cometkit": (_openai_through_cometkit, "openai SDK through cometkit"),
    "guide-semaphore": (_guide_semaphore, "guide: Semaphore(5) + openai"),
    "guide-429-loop": (_guide_retry_loop, "guide: 429 loop + openai"),
    "guide-both": (_guide_both, "guide: Semaphore(5) + 429 loop"),
}


def make(spec: Spec) -> Contender:
    factory, _label = CONTENDERS[spec.client]
    contender = factory(spec)
    if contender.run is None:
        pool = ThreadPoolExecutor(max_workers=spec.threads, thread_name_prefix="bench")

        def run(items: Iterable[int]) -> Iterator[Any]:
            def safe(i: int) -> Any:
                try:
                    return contender.call(i)
                except Exception as exc:
                    return exc
            return pool.map(safe, items)

        close = contender.close

        def close_all() -> None:
            pool.shutdown(wait=True)
            close()

        contender.run, contender.close = run, close_all
    return contender
