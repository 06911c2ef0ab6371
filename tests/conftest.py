"""Make the suite run from a checkout that was never installed (``pytest`` from the root).

Installed, cometkit registers its pytest fixtures (``cometkit_sandbox`` & co.) through the
``pytest11`` entry point; a bare checkout has no entry points, so register the same module.
"""

from __future__ import annotations

from typing import Any

PLUGIN = "cometkit.sandbox.pytest_plugin"


def pytest_configure(config: Any) -> None:
    manager = config.pluginmanager
    if not manager.has_plugin("cometkit_sandbox") and not manager.has_plugin(PLUGIN):
        manager.import_plugin(PLUGIN)
