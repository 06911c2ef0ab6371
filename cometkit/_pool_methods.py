"""Running the caller's own functions on a :class:`~cometkit.Client`'s worker pool.

:class:`PoolMethods` is the part of ``Client`` that gives out its pool: ``submit`` for one
function, ``map`` for an iterable of any size with results in input order, in bounded memory
(a window of items in the pool, a bounded buffer of results), and ``workers`` for a front
that schedules its own way (``cometkit batch``). ``Client`` inherits it.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar, Union

from ._client_args import check_callable, check_count
from ._workers import Window, WorkerPool

__all__ = ["PoolMethods", "MIN_RESULTS_BUFFERED"]

T = TypeVar("T")
R = TypeVar("R")

#: Results ``Client.map`` may hold for its consumer at least (finished items behind one that
#: is not), whatever its window: enough that the items behind a call asleep for a few seconds
#: before a retry keep going out at the pool's pace, in a few megabytes at most.
MIN_RESULTS_BUFFERED = 1024


class PoolMethods:
    """``workers``, ``submit`` and ``map`` of :class:`~cometkit.Client`, a base class of it."""

    _executor: WorkerPool
    concurrency: int

    @property
    def workers(self) -> WorkerPool:
        """The worker pool that :meth:`map`, :meth:`submit` and ``cometkit batch`` run on: at
        most ``concurrency`` calls run at once, and one asleep before a retry gives its place
        to the next (see :mod:`cometkit._workers`)."""
        return self._executor

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the client's worker pool."""
        check_callable(fn)
        return self._executor.submit(fn, *args, **kwargs)

    def map(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        *,
        return_exceptions: bool = False,
        max_in_flight: Optional[int] = None,
    ) -> Iterator[Union[R, BaseException]]:
        """Run ``fn(item)`` on the worker pool; yield results in input order.

        At most ``max_in_flight`` items (default twice the concurrency) run or wait in the pool
        at a time, not counting calls asleep before a retry, and at most eight times that many
        results (finished, or behind a slow one; at least :data:`MIN_RESULTS_BUFFERED`) wait
        for the consumer, so a huge iterator never fills memory while one item's back-off of
        a few seconds does not hold back the items behind it. A call sleeping before a retry
        gives its worker's place to the next item, so the pool keeps sending while it waits
        (see :mod:`cometkit._workers`). With
        ``return_exceptions`` an item's exception is yielded in its place instead of raised.
        """
        check_callable(fn)
        window = 2 * self.concurrency if max_in_flight is None else check_count(
            "max_in_flight", max_in_flight)
        buffered_max = max(8 * window, MIN_RESULTS_BUFFERED)
        try:
            items = iter(iterable)
        except TypeError:
            raise TypeError(f"iterable must be iterable (a list, a generator...), got "
                            f"{type(iterable).__name__}") from None
        pending: deque[Future[R]] = deque()
        exhausted = False
        in_flight = Window(self._executor, window)

        def refill() -> None:
            nonlocal exhausted
            while not exhausted and in_flight.has_room() and len(pending) < buffered_max:
                try:
                    item = next(items)
                except StopIteration:
                    exhausted = True
                    return
                future = self._executor.submit(fn, item)
                in_flight.add(future)
                pending.append(future)

        refill()

        def results() -> Iterator[Union[R, BaseException]]:
            try:
                while pending:
                    head = pending[0]
                    while not head.done():
                        refill()
                        # until the head is done, or room opens for more (an item ended, a
                        # call fell asleep before a retry)
                        in_flight.wait(lambda head=head: head.done() or (
                            not exhausted and in_flight.has_room()
                            and len(pending) < buffered_max))
                    pending.popleft()
                    try:
                        value: Union[R, BaseException] = head.result()
                    except Exception as exc:
                        if not return_exceptions:
                            raise
                        value = exc
                    refill()
                    yield value
            finally:
                for future in pending:
                    future.cancel()

        return results()
