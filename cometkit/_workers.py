"""The client's worker pool, where a call that sleeps before a retry gives its place away.

A pool of ``concurrency`` threads that each sleep through a retry's back-off would send
nothing while they sleep: with 5 % of calls retried after a second or two, most of a batch's
wall time is then spent asleep. Here at most ``concurrency`` calls *run* at once (hold a
place); a call about to sleep before its next attempt gives its place to the next queued call
(:func:`sleep_aside`) and takes a place back when it wakes, before its next attempt. The pool
has spare threads for the sleepers, and a :class:`Window` of submitted work (``Client.map``,
``cometkit batch``) does not count them, so the work behind them keeps going out. A direct
``create()`` on the caller's own thread simply sleeps (it has no place to give).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar

__all__ = ["WorkerPool", "Window", "sleep_aside"]

T = TypeVar("T")

#: Threads per place that a pool may start for calls asleep before a retry.
SPARE_THREADS_PER_PLACE = 8

_current = threading.local()


class WorkerPool:
    """``concurrency`` places for running calls, on up to ``concurrency + spare`` threads.

    :param concurrency: calls that may run (not sleep before a retry) at once.
    :param spare: threads beyond ``concurrency`` for calls asleep before a retry (default:
        :data:`SPARE_THREADS_PER_PLACE` per place; they start only when needed). With more
        calls asleep than that, the work behind them waits for a thread.
    """

    def __init__(self, concurrency: int, *, spare: Optional[int] = None,
                 thread_name_prefix: str = "cometkit") -> None:
        self.concurrency = concurrency
        self.spare = SPARE_THREADS_PER_PLACE * concurrency if spare is None else spare
        self._places = threading.BoundedSemaphore(concurrency)
        #: Calls of this pool asleep before a retry; ``changed`` is notified when it changes.
        self.asleep = 0
        self.changed = threading.Condition()
        self._executor = ThreadPoolExecutor(max_workers=concurrency + self.spare,
                                            thread_name_prefix=thread_name_prefix)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` once a place is free."""
        return self._executor.submit(self._run, fn, args, kwargs)

    def _run(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        self._places.acquire()
        _current.pool = self
        try:
            return fn(*args, **kwargs)
        finally:
            _current.pool = None
            self._places.release()

    def _sleeping(self, delta: int) -> None:
        with self.changed:
            self.asleep += delta
            self.changed.notify_all()

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait)


def sleep_aside(sleep: Callable[[float], None], seconds: float) -> None:
    """Sleep ``seconds`` with ``sleep`` (the client's clock); on a worker of a
    :class:`WorkerPool`, give its place to another call meanwhile, and take one back (waiting
    for it, if every place is taken) before returning."""
    pool: Optional[WorkerPool] = getattr(_current, "pool", None)
    if pool is None:
        sleep(seconds)
        return
    _current.pool = None  # a nested sleep (none today) must not give the place twice
    pool._sleeping(+1)
    pool._places.release()
    try:
        sleep(seconds)
    finally:
        pool._sleeping(-1)
        pool._places.acquire()
        _current.pool = pool


class Window:
    """At most ``size`` submitted items of one producer that are queued or running, not
    counting the pool's calls asleep before a retry: the one bound on work handed to a
    :class:`WorkerPool` by ``Client.map`` and ``cometkit batch``. The producer asks
    :meth:`has_room` and waits with :meth:`wait` (woken when an item ends, or a call falls
    asleep or wakes), so it never polls and never rescans what it submitted.
    """

    def __init__(self, pool: WorkerPool, size: int) -> None:
        self.pool = pool
        self.size = size
        #: Submitted items not done yet (asleep or not).
        self.unfinished = 0

    def has_room(self) -> bool:
        return self.unfinished - self.pool.asleep < self.size

    def add(self, future: Future) -> None:
        """Count a submitted item until it is done."""
        with self.pool.changed:
            self.unfinished += 1
        future.add_done_callback(self._done)

    def _done(self, _future: Future) -> None:
        with self.pool.changed:
            self.unfinished -= 1
            self.pool.changed.notify_all()

    def wait(self, ready: Callable[[], bool], timeout_s: float = 1.0) -> bool:
        """Wait (at most ``timeout_s``) until ``ready()`` holds or something changed;
        ``ready()``'s last value."""
        with self.pool.changed:
            if not ready():
                self.pool.changed.wait(timeout_s)
            return ready()
