"""What a plugin learns about the client it serves."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .records import Clock, SystemClock

__all__ = ["ClientContext"]


@dataclass(frozen=True)
class ClientContext:
    """Handed to every factory hook, once per client.

    :ivar plugin_options: validated options of every enabled plugin, by plugin name; read your
        own with :meth:`options`. The value of an option declared ``secret=True`` is a
        :class:`~cometkit.options.SecretText`: the string itself, shown as ``'***'`` by
        ``repr``, so ``repr(ctx)`` (and a log line of it) never shows a Redis password.
    :ivar concurrency: the client's worker-pool size (and connection-pool size).
    :ivar base_url: the API base URL (never contains the key).
    :ivar server_address: host name of ``base_url``, for metrics.
    :ivar timeout_s: ``(connect, read)`` timeouts in seconds.
    :ivar api_key_fingerprint: a short SHA-256 digest of the API key: a namespace for shared
        state that tells keys apart without revealing them ("" when there is no key).
    :ivar clock: the clock to read and sleep on; tests inject a fake one.
    :ivar random: the random source for jitter; tests inject a seeded one.
    :ivar config_path: the file the configuration came from, if any.
    """

    plugin_options: Mapping[str, Mapping[str, Any]]
    concurrency: int
    base_url: str
    server_address: str
    timeout_s: tuple[float, float]
    api_key_fingerprint: str = ""
    clock: Clock = field(default_factory=SystemClock)
    random: random.Random = field(default_factory=random.Random)
    config_path: Optional[str] = None

    def options(self, plugin_name: str) -> Mapping[str, Any]:
        """The validated options of ``plugin_name`` (defaults filled in)."""
        return self.plugin_options.get(plugin_name, {})

    def enabled(self, plugin_name: str) -> bool:
        """Whether ``plugin_name`` is enabled for this client."""
        return plugin_name in self.plugin_options
