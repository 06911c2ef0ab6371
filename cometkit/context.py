"""What a plugin learns about the client it serves."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .clock import Clock, SystemClock
from .prices import PriceTable

__all__ = ["ClientContext"]


@dataclass(frozen=True)
class ClientContext:
    """Handed to every factory hook, once per client and plugin.

    Each plugin gets its own copy (:meth:`for_plugin`), holding its own section only: a plugin
    reads its options with ``ctx.options()`` whatever name it was registered or configured
    under (an entry-point name, or a module path such as ``mycompany.sink``), and never sees
    another plugin's options (a Redis password included). ``Client.context`` is the client's
    own, with every plugin's options, for the program that made the client.

    :ivar plugin_options: validated options by plugin name: only the plugin's own section in a
        plugin's context. The value of an option declared ``secret=True`` is a
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
    :ivar plugin_name: the plugin this context was handed to (``None``: the client's own).
    :ivar enabled_plugins: names of every plugin enabled for this client.
    :ivar prices: the configuration's ``prices:`` (what tokens cost per model), for sinks that
        show or count money; empty when none are configured.
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
    plugin_name: Optional[str] = None
    enabled_plugins: frozenset = frozenset()
    prices: PriceTable = field(default_factory=PriceTable)

    def options(self, plugin_name: Optional[str] = None) -> Mapping[str, Any]:
        """Validated options (defaults filled in). In a plugin's context: that plugin's own
        section, whatever ``plugin_name`` says (a module configured by path may still pass the
        name it was written with). In the client's: the section of ``plugin_name``."""
        if self.plugin_name is not None:
            return self.plugin_options.get(self.plugin_name, {})
        if plugin_name is None:
            return {}
        return self.plugin_options.get(plugin_name, {})

    def enabled(self, plugin_name: str) -> bool:
        """Whether ``plugin_name`` is enabled for this client."""
        return plugin_name in self.enabled_plugins or plugin_name in self.plugin_options

    def for_plugin(self, plugin_name: str) -> ClientContext:
        """The context handed to ``plugin_name``'s factories: its own section only."""
        return dataclasses.replace(
            self, plugin_options={plugin_name: self.plugin_options.get(plugin_name, {})},
            plugin_name=plugin_name,
            enabled_plugins=self.enabled_plugins or frozenset(self.plugin_options))
