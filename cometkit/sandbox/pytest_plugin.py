"""pytest fixtures that serve the sandbox, so code using cometkit is tested offline.

Registered through the ``pytest11`` entry point ``cometkit_sandbox``: pytest imports this
module in every run of every project that has cometkit installed, so it imports the server
only when a fixture is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

if TYPE_CHECKING:
    from .server import Sandbox


@pytest.fixture
def cometkit_sandbox() -> Iterator[Sandbox]:
    """A running default :class:`~cometkit.sandbox.Sandbox` (free port, no limits, no faults).

    Point the code under test at ``cometkit_sandbox.base_url``; stopped after the test.
    """
    from .server import Sandbox

    with Sandbox() as sandbox:
        yield sandbox


@pytest.fixture
def cometkit_sandbox_factory() -> Iterator[Callable[..., Sandbox]]:
    """``make(**kwargs)`` starts a :class:`~cometkit.sandbox.Sandbox` with those arguments
    (``rpm=60``, ``fault_rate=0.1``, ``api_key="sk-test"``...); all are stopped after the test.
    """
    from .server import Sandbox

    started: list = []

    def make(**kwargs: Any) -> Sandbox:
        sandbox = Sandbox(**kwargs)
        sandbox.start()
        started.append(sandbox)
        return sandbox

    try:
        yield make
    finally:
        for sandbox in reversed(started):
            sandbox.stop()
