"""Make the suite run from a checkout that was never installed (``pytest`` from the root).

Installed, cometkit registers its pytest fixtures (``cometkit_sandbox`` & co.) through the
``pytest11`` entry point and every subprocess the tests start (``python -m cometkit``, fleet
workers) imports the installed package. A bare checkout has neither: register the fixture
module here, and hand the checkout to subprocesses through ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cometkit._checkout import installed

PLUGIN = "cometkit.sandbox.pytest_plugin"
ROOT = Path(__file__).resolve().parent.parent


if not installed():
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def pytest_configure(config: Any) -> None:
    manager = config.pluginmanager
    if not manager.has_plugin("cometkit_sandbox") and not manager.has_plugin(PLUGIN):
        manager.import_plugin(PLUGIN)
