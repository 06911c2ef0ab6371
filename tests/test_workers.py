"""A call that sleeps before a retry gives its worker's place to another call (issue 14, part
5): ``Client.map``, ``Client.submit`` and ``cometkit batch`` keep sending while some calls wait
out a back-off, and the pool never runs more than ``concurrency`` calls at once."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from scripted_server import Reply, ScriptedServer, Seen, chat_body, json_reply

import cometkit
from cometkit._workers import WorkerPool, sleep_aside

KEY = "sk-test-workers-4d2c"
MESSAGES = [{"role": "user", "content": "hi"}]


class BlockingClock:
    """Real time, except that a retry's sleep (the back-off, over half a second) lasts until
    the test lets it end (at most 10 s), so a test can look at what the pool did while a call
    slept."""

    def __init__(self) -> None:
        self.sleeping = threading.Event()
        self.wake = threading.Event()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds < 0.5:  # the limiter's own short waits (pacing): real ones
            time.sleep(seconds)
            return
        self.sleeps.append(seconds)
        self.sleeping.set()
        assert self.wake.wait(10), "the test never let the retry's sleep end"


def test_a_sleeping_call_gives_its_place_and_takes_one_back_before_it_goes_on():
    pool = WorkerPool(1)
    clock = BlockingClock()
    order: list[str] = []

    def sleeper() -> str:
        order.append("sleeper sends")
        sleep_aside(clock.sleep, 1.0)
        order.append("sleeper sends again")
        return "sleeper"

    def other() -> str:
        order.append("other runs")
        return "other"

    try:
        first = pool.submit(sleeper)
        assert clock.sleeping.wait(5)
        # One place, taken by a sleeping call: the next call runs all the same.
        assert pool.submit(other).result(5) == "other"
        clock.wake.set()
        assert first.result(5) == "sleeper"
    finally:
        pool.shutdown()
    assert order == ["sleeper sends", "other runs", "sleeper sends again"]


def test_a_woken_call_waits_for_a_place_so_no_more_than_concurrency_run_at_once():
    pool = WorkerPool(1)
    clock = BlockingClock()
    running, most = 0, 0
    lock = threading.Lock()
    release_other = threading.Event()

    def runs(delta: int) -> None:
        nonlocal running, most
        with lock:
            running += delta
            most = max(most, running)

    def sleeper() -> None:
        runs(+1)
        runs(-1)  # asleep from here: not running
        sleep_aside(clock.sleep, 1.0)
        runs(+1)
        runs(-1)

    def other() -> bool:
        runs(+1)
        try:
            return release_other.wait(5)
        finally:
            runs(-1)

    try:
        first = pool.submit(sleeper)
        assert clock.sleeping.wait(5)
        second = pool.submit(other)
        time.sleep(0.05)
        clock.wake.set()  # the sleeper wakes while the other call holds the only place
        time.sleep(0.05)
        assert not first.done()
        release_other.set()
        assert second.result(5) is True and first.result(5) is None
    finally:
        pool.shutdown()
    assert most == 1


def test_outside_a_pool_it_simply_sleeps():
    clock = BlockingClock()
    clock.wake.set()
    sleep_aside(clock.sleep, 2.5)
    assert clock.sleeps == [2.5]


def first_fails_once(clock: BlockingClock, answered_while_asleep: list) -> Any:
    """A server answering 503 to the first request of "first" (once), and noting what it
    answers while ``clock`` has a retry asleep; after three of those, the sleep ends."""
    firsts = []

    def handler(seen: Seen) -> Reply:
        text = seen.json()["messages"][0]["content"]
        if text == "first":
            firsts.append(text)
            if len(firsts) == 1:
                return json_reply(503, {"error": {"message": "overloaded",
                                                  "type": "server_error"}})
        if clock.sleeping.is_set() and not clock.wake.is_set():
            answered_while_asleep.append(text)
            if len(answered_while_asleep) == 3:
                clock.wake.set()
        return json_reply(200, chat_body(text))

    return ScriptedServer(handler)


def test_map_keeps_sending_while_a_call_waits_out_its_back_off():
    """concurrency=1: the first call's 503 is retried after a back-off; while it sleeps, the
    other items are sent and answered on the pool's one place."""
    answered_while_asleep: list[str] = []
    clock = BlockingClock()

    with first_fails_once(clock, answered_while_asleep) as server:
        config = {"plugins": {"backoff": {"retry_on": [429, 503]}}}
        with cometkit.Client(KEY, server.base_url, concurrency=1, clock=clock,
                             config=config) as client:
            texts = ["first", "a", "b", "c"]
            out = list(client.map(lambda text: client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": text}]), texts))
    assert [o.choices[0].message.content for o in out] == texts  # in input order
    assert sorted(answered_while_asleep) == ["a", "b", "c"]
    assert len(clock.sleeps) == 1


@pytest.mark.parametrize("window", [1, 3, 50])
def test_map_submits_at_most_its_window_and_yields_every_item_in_order(window):
    seen_running: list[int] = []
    running = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal running
        with lock:
            running += 1
            seen_running.append(running)
        time.sleep(0.001)
        with lock:
            running -= 1
        return i * 2

    with cometkit.Client(KEY, "http://127.0.0.1:9/v1", concurrency=4,
                         config={"plugins": {}}) as client:
        assert list(client.map(work, range(200), max_in_flight=window)) == \
            [i * 2 for i in range(200)]
    assert max(seen_running) <= min(window, 4)



def test_batch_keeps_sending_while_a_request_waits_out_its_back_off(tmp_path):
    """``cometkit batch`` runs on the same pool: with one place, the other lines go out
    while the first one's retry waits."""
    from cometkit.batch import BatchRunner

    answered_while_asleep: list[str] = []
    clock = BlockingClock()

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({
        "custom_id": text, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m1", "messages": [{"role": "user", "content": text}]}}) + "\n"
        for text in ("first", "a", "b", "c")))
    with first_fails_once(clock, answered_while_asleep) as server, cometkit.Client(
            KEY, server.base_url, concurrency=1, clock=clock,
            config={"plugins": {"backoff": {"retry_on": [503]}}}) as client, \
            BatchRunner(source, tmp_path / "out.jsonl") as runner:
        result = runner.run(client)
    assert (result.ok, result.failed) == (4, 0)
    assert sorted(answered_while_asleep) == ["a", "b", "c"]
