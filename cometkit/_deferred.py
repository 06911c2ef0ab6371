"""Work that finalizers hand over, run later on a normal thread.

A stream dropped unclosed ends from a finalizer, and a finalizer can run anywhere: inside a
lock of the limiter, of a metrics sink, of urllib3's pool. Calling the limiter or the sinks
from there could deadlock, so the finalizer only puts the ending on this queue
(``SimpleQueue.put`` is reentrant). The next call drains it, and so does a daemon thread
(started with the first held stream) so that a slot comes back even when no further call is
made while another thread waits inside the limiter.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Optional

__all__ = ["Deferred"]

logger = logging.getLogger("cometkit")


class Deferred:
    """The queue of endings handed over by finalizers, and the thread that runs them."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        #: The daemon thread draining the queue, once a held stream started it.
        self.reaper: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def put(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` soon on a normal thread. Safe from a finalizer or ``__del__``
        (``SimpleQueue.put`` is reentrant), which may run inside any lock -- the limiter's or a
        sink's -- where calling them directly could deadlock."""
        self.queue.put((fn, args))

    def drain(self) -> None:
        """Run what finalizers handed over; each item once, whoever drains."""
        while True:
            try:
                fn, args = self.queue.get_nowait()
            except queue.Empty:
                return
            if fn is None:  # close()'s word to the reaper: leave it for the reaper
                self.queue.put((fn, args))
                return
            self._run(fn, args)

    @staticmethod
    def _run(fn: Callable[..., None], args: tuple) -> None:
        try:
            fn(*args)
        except Exception:
            logger.warning("ending an abandoned stream failed", exc_info=True)

    def start_reaper(self) -> None:
        """A daemon thread that drains the queue as items come, so a slot comes back even
        when no further call is made (another thread may be waiting inside the limiter)."""
        with self._lock:
            if self.reaper is not None:
                return
            self.reaper = threading.Thread(target=self._reap, name="cometkit-stream-reaper",
                                           daemon=True)
        self.reaper.start()

    def _reap(self) -> None:
        while True:
            fn, args = self.queue.get()
            if fn is None:
                return
            self._run(fn, args)

    def close(self) -> None:
        """Stop the reaper (it runs what came before the word to stop), then run the rest."""
        reaper = self.reaper
        if reaper is not None:
            self.queue.put((None, ()))
            reaper.join(timeout=10)
        self.drain()
