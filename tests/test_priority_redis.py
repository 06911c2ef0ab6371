"""Priority lanes across a fleet: the Redis store against a real ``redis-server``.

Two ``RedisLimiter`` objects with one namespace are two processes of one fleet (each has its
own pid-less waiter ids and its own threads); the gate script is also asked directly, to
count the starvation share and show that a waiter whose process is gone stops blocking.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Optional

import pytest
from redis_server import REDIS_SERVER, RedisServer
from requests.structures import CaseInsensitiveDict

from cometkit import AttemptResult, RateLimitError, RequestInfo, SystemClock
from cometkit_plugins.limiting.fleet_lanes import GO, OVERTAKE, WAIT, FleetLanes
from cometkit_plugins.limiting.redis_store import LANE_GATE_LUA, LANE_LEAVE_LUA, lane_scope
from cometkit_plugins.redis_limiter import RedisLimiter

redis = pytest.importorskip("redis", reason="redis-py is not installed: pip install "
                                            "'cometkit[redis]'")

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(60),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH"),
]

JOIN_S = 10.0
LANES = {"interactive": 0, "default": 1, "batch": 2}


def request(name: str, priority: str, started_at: Optional[float] = None) -> RequestInfo:
    return RequestInfo(f"ck-{name}", "chat", "POST", "/chat/completions", "m1",
                       started_at=time.monotonic() if started_at is None else started_at,
                       priority=priority, priority_rank=LANES[priority])


def ok(req: RequestInfo) -> AttemptResult:
    return AttemptResult(req, 1, status_code=200, headers=CaseInsensitiveDict())


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


def wait_for(condition: Any, timeout_s: float = JOIN_S) -> None:
    pause = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        pause.wait(0.01)
    raise AssertionError("condition not reached")


def test_an_interactive_call_on_one_host_overtakes_batch_traffic_of_another(redis_server, rdb):
    one, two = (RedisLimiter(url=redis_server.url, namespace="ns", max_concurrency=1,
                             adaptive=False) for _ in range(2))
    waiting_key, client_waiting = FleetLanes.keys(lane_scope("cometkit:ns", "m1"),
                                                  "cometkit:ns:all")[0::3]
    try:
        first = request("held", "default")
        held = one.acquire(first, 5)
        order: list[str] = []

        def call(limiter: RedisLimiter, req: RequestInfo) -> None:
            permit = limiter.acquire(req, JOIN_S)
            order.append(req.request_id[3:])
            limiter.release(permit, ok(req))

        threads = [threading.Thread(target=call, args=(one, request(f"b{n}", "batch")),
                                    daemon=True) for n in range(3)]
        for thread in threads:
            thread.start()
        wait_for(lambda: rdb.zcard(waiting_key) == 3)
        urgent = threading.Thread(target=call, args=(two, request("i", "interactive")),
                                  daemon=True)
        urgent.start()
        wait_for(lambda: rdb.zcard(waiting_key) == 4)
        # ... and refused once (in the client-wide queue too): a batch try that had passed
        # the gate before the interactive call queued has ended by then.
        wait_for(lambda: rdb.zcard(client_waiting) == 4)
        one.release(held, ok(first))
        for thread in [*threads, urgent]:
            thread.join(JOIN_S)
        assert order[0] == "i" and sorted(order[1:]) == ["b0", "b1", "b2"]
        assert rdb.zcard(waiting_key) == 0  # every waiter left the fleet's queue
    finally:
        one.close()
        two.close()


def test_a_batch_call_times_out_behind_a_higher_lane_saying_so(redis_server, rdb):
    one, two = (RedisLimiter(url=redis_server.url, namespace="ns", max_concurrency=1,
                             adaptive=False) for _ in range(2))
    try:
        held_request = request("held", "default")
        held = one.acquire(held_request, 5)
        urgent = threading.Thread(target=lambda: one.release(
            one.acquire(request("i", "interactive"), JOIN_S), ok(held_request)), daemon=True)
        urgent.start()
        waiting_key = FleetLanes.keys(lane_scope("cometkit:ns", "m1"), "cometkit:ns:all")[0]
        wait_for(lambda: rdb.zcard(waiting_key) == 1)
        with pytest.raises(RateLimitError, match="calls of a higher priority lane"):
            two.acquire(request("b", "batch"), 0.2)
        assert rdb.zcard(waiting_key) == 1  # the batch call left; the interactive one waits
        one.release(held, ok(held_request))
        urgent.join(JOIN_S)
    finally:
        one.close()
        two.close()


def gate(redis_server: RedisServer, share: float = 0.5, starvation_s: float = 5.0,
         ttl_s: float = 5.0) -> FleetLanes:
    client = redis.Redis.from_url(redis_server.url)
    return FleetLanes(client.register_script(LANE_GATE_LUA),
                      client.register_script(LANE_LEAVE_LUA), starvation_share=share,
                      starvation_s=starvation_s, clock=SystemClock(), waiter_ttl_s=ttl_s)


def test_the_starving_oldest_lower_waiter_overtakes_with_a_whole_credit_only(redis_server,
                                                                            rdb):
    lanes = gate(redis_server, share=0.5, starvation_s=5.0)
    keys = FleetLanes.keys("cometkit:ns:model:m1", "cometkit:ns:all")
    now = time.monotonic()
    urgent = request("i", "interactive", now)
    old, older, young = (request("b-old", "batch", now - 20),
                         request("d-older", "default", now - 30),
                         request("b-young", "batch", now - 1))
    assert lanes.ask(keys, "i", urgent) == GO
    assert [lanes.ask(keys, name, req) for name, req in
            (("b-old", old), ("d-older", older), ("b-young", young))] == [WAIT] * 3
    for n in range(2):  # two admissions elsewhere: a whole credit at a share of 0.5
        assert lanes.ask(keys, f"x{n}", urgent) == GO
        lanes.leave(keys, f"x{n}", admitted=True)
    # the oldest waiter below the top lane, whatever its own lane, and only it
    assert [lanes.ask(keys, name, req) for name, req in
            (("b-old", old), ("d-older", older), ("b-young", young))] == [WAIT, OVERTAKE, WAIT]
    assert lanes.ask(keys, "i", urgent) == GO  # the top lane may always try
    assert lanes.leave(keys, "d-older", admitted=True, overtook=True) == pytest.approx(0.0)
    assert lanes.ask(keys, "b-old", old) == WAIT  # the credit is spent
    lanes.leave(keys, "i", admitted=True)
    assert lanes.ask(keys, "b-old", old) == GO  # no higher lane waits any more


def test_a_waiter_not_heard_of_for_its_ttl_no_longer_blocks_the_fleet(redis_server, rdb):
    lanes = gate(redis_server, share=0.0, ttl_s=0.2)
    keys = FleetLanes.keys("cometkit:ns:model:m1", "cometkit:ns:all")
    assert lanes.ask(keys, "gone", request("i", "interactive")) == GO  # then its process dies
    batch = request("b", "batch")
    assert lanes.ask(keys, "b", batch) == WAIT
    time.sleep(0.3)  # past the dead waiter's heartbeat (Redis' time)
    assert lanes.ask(keys, "b", batch) == GO
    assert rdb.zrange(keys[0], 0, -1) == ["b"]


WAITING_PROCESS = """
import sys, time
from cometkit import RequestInfo
from cometkit_plugins.redis_limiter import RedisLimiter
limiter = RedisLimiter(url=sys.argv[1], namespace="ns", max_concurrency=1, adaptive=False)
print("waiting", flush=True)
limiter.acquire(RequestInfo("ck-i", "chat", "POST", "/chat/completions", "m1",
                            started_at=time.monotonic(), priority="interactive",
                            priority_rank=0), 60)
"""


def test_a_killed_process_waiting_in_a_higher_lane_stops_blocking_within_its_ttl(
        redis_server, rdb):
    """A process killed (SIGKILL) while its interactive call waited: its entry expires and the
    fleet's batch call is admitted; nothing is left behind in the queue."""
    limiter = RedisLimiter(url=redis_server.url, namespace="ns", max_concurrency=1,
                           adaptive=False)
    waiting_key = FleetLanes.keys(lane_scope("cometkit:ns", "m1"), "cometkit:ns:all")[0]
    held_request = request("held", "default")
    try:
        held = limiter.acquire(held_request, 5)
        process = subprocess.Popen([sys.executable, "-c", WAITING_PROCESS, redis_server.url],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, text=True)
        try:
            assert process.stdout.readline().strip() == "waiting"
            wait_for(lambda: rdb.zcard(waiting_key) == 1)
        finally:
            process.kill()
            process.wait(10)
        limiter.release(held, ok(held_request))
        batch = request("b", "batch")
        permit = limiter.acquire(batch, 20)  # within the dead waiter's 5 s heartbeat
        limiter.release(permit, ok(batch))
        assert rdb.zcard(waiting_key) == 0
    finally:
        limiter.close()


def test_waiting_for_a_client_wide_rate_an_interactive_call_overtakes_other_models(
        redis_server, rdb):
    """Held up by the rate every model shares, the interactive call (model a) of one process
    goes before the batch calls (model b) of another; a model's own limits hold up only it."""
    one, two = (RedisLimiter(url=redis_server.url, namespace="ns", max_concurrency=8,
                             requests_per_minute=120, burst=0, adaptive=False)
                for _ in range(2))
    client_waiting = FleetLanes.keys(lane_scope("cometkit:ns", "a"), "cometkit:ns:all")[3]
    order: list[str] = []
    lock = threading.Lock()

    def call(limiter: RedisLimiter, req: RequestInfo) -> None:
        permit = limiter.acquire(req, JOIN_S)
        with lock:
            order.append(req.request_id[3:])
        limiter.release(permit, ok(req))

    def on(model: str, name: str, lane: str) -> RequestInfo:
        return RequestInfo(f"ck-{name}", "chat", "POST", "/chat/completions", model,
                           started_at=time.monotonic(), priority=lane,
                           priority_rank=LANES[lane])

    try:
        call(one, on("b", "first", "batch"))  # the bucket is empty now
        batch = [threading.Thread(target=call, args=(one, on("b", f"b{n}", "batch")),
                                  daemon=True) for n in range(3)]
        for thread in batch:
            thread.start()
        wait_for(lambda: rdb.zcard(client_waiting) == 3)
        urgent = threading.Thread(target=call, args=(two, on("a", "i", "interactive")),
                                  daemon=True)
        urgent.start()
        wait_for(lambda: rdb.zcard(client_waiting) == 4)
        with lock:
            admitted_before = len(order)
        for thread in [*batch, urgent]:
            thread.join(JOIN_S)
        assert sorted(order) == ["b0", "b1", "b2", "first", "i"]
        assert order.index("i") == admitted_before  # the next one admitted
        assert rdb.zcard(client_waiting) == 0
    finally:
        one.close()
        two.close()
