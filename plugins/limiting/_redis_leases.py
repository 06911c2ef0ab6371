"""The leases this process holds in Redis, kept alive while their attempts run.

Concurrency in the Redis store is a set of *leases*: a sorted set per scope (the client, each
model) whose members are permit ids scored by their expiry. :class:`LeaseKeeper` remembers the
leases of this process's running attempts and a background thread renews them every
``lease_ttl / 3`` through ``renew.lua``, so a process killed with SIGKILL loses its slots
within ``lease_ttl`` while a long call keeps its own.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from ._redis_fallback import RedisFallback
from ._redis_lanes import RedisPermit
from ._redis_scripts import text

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("cometkit.redis_limiter")


class LeaseKeeper:
    """The leases of this process's running attempts, and the thread that renews them.

    :param renew: the registered ``renew.lua`` script.
    :param client_slots: the key of the client-wide lease set.
    :param lease_ttl: seconds a lease stays taken without renewal.
    :param reachability: whether Redis answers (renewals pause while it does not).
    :param closing: set when the limiter closes: the renewal thread stops.
    :param name: the renewal thread's name.
    """

    def __init__(self, renew: Any, client_slots: str, lease_ttl: float,
                 reachability: RedisFallback, closing: threading.Event, name: str) -> None:
        self._renew = renew
        self._client_slots = client_slots
        self.lease_ttl = lease_ttl
        self.lease_ms = int(round(lease_ttl * 1000))
        self._reachability = reachability
        self._closing = closing
        self._name = name
        self._lock = threading.Lock()
        self._held: dict[str, RedisPermit] = {}
        self._renewer: Optional[threading.Thread] = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def hold(self, permit: RedisPermit) -> None:
        """A lease was granted: renew it until :meth:`drop`."""
        with self._lock:
            self._held[permit.id] = permit
        self._ensure_renewer()

    def drop(self, permit: RedisPermit) -> bool:
        """Stop renewing ``permit``; ``False`` if it was released before (nothing done)."""
        with self._lock:
            if permit.released:
                return False
            permit.released = True
            self._held.pop(permit.id, None)
        return True

    def join(self, timeout: float) -> None:
        """Wait for the renewal thread to stop (after ``closing`` was set)."""
        renewer = self._renewer
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=timeout)

    def after_fork(self) -> None:
        """In a forked child (gunicorn --preload): the parent's leases and renewal thread are
        not this process's."""
        self._lock = threading.Lock()
        self._held = {}
        self._renewer = None

    def _ensure_renewer(self) -> None:
        with self._lock:
            if self._renewer is not None and self._renewer.is_alive():
                return
            self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                             name=self._name)
            self._renewer.start()

    def _renew_loop(self) -> None:
        """Extend the leases of running attempts every ``lease_ttl / 3`` (real time: the
        leases expire in Redis' time, whatever clock the client was given)."""
        while not self._closing.wait(self.lease_ttl / 3.0):
            with self._lock:
                permits = list(self._held.values())
            if not permits or self._reachability.down:
                continue
            keys: list[str] = []
            args: list[Any] = [self.lease_ms]
            for permit in permits:
                keys.append(self._client_slots)
                args.append(permit.id)
                if permit.lane.max_concurrency:
                    keys.append(permit.lane.slots)
                    args.append(permit.id)
            try:
                lost = {text(item) for item in self._renew(keys=keys, args=args)}
            except self._reachability.errors as exc:
                self._reachability.went_down(exc)
                continue
            with self._lock:
                expired = [self._held[i] for i in lost if i in self._held]
            for permit in expired:
                logger.warning("the lease of a running attempt (%r) had expired before it was "
                               "renewed: this process stalled for more than lease_ttl=%g s, and "
                               "its slot may have been given to another", permit,
                               self.lease_ttl)
