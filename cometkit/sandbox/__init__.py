"""The sandbox: an OpenAI-compatible CometAPI stand-in on 127.0.0.1 for tests and benchmarks.

It answers deterministically (chat echoes the last user message, embeddings hash their
input) and behaves like a provider under load: per-model rpm / tpm / in-flight limits, fixed
windows, its own token count, 429s with ``Retry-After`` and the rate-limit headers of OpenAI,
LiteLLM or Anthropic, and injected faults. See ``docs/sandbox.md``.

Names load on first use: the pytest plugin imports this package in every test run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .faults import DEFAULT_FAULT_KINDS, FAULT_KINDS
    from .process import SandboxProcess
    from .server import (
        HEADER_FAMILIES,
        IN_FLIGHT_STYLES,
        OVERLOAD_STYLES,
        RETRY_AFTER_STYLES,
        WINDOW_ALIGNS,
        WINDOW_RETRY_AFTERS,
        Sandbox,
    )

__all__ = ["Sandbox", "SandboxProcess", "FAULT_KINDS", "DEFAULT_FAULT_KINDS",
           "RETRY_AFTER_STYLES", "HEADER_FAMILIES", "WINDOW_ALIGNS", "WINDOW_RETRY_AFTERS",
           "IN_FLIGHT_STYLES", "OVERLOAD_STYLES"]

_HOME = {
    "Sandbox": "server",
    "RETRY_AFTER_STYLES": "server",
    "HEADER_FAMILIES": "server",
    "WINDOW_ALIGNS": "server",
    "WINDOW_RETRY_AFTERS": "server",
    "IN_FLIGHT_STYLES": "server",
    "OVERLOAD_STYLES": "server",
    "SandboxProcess": "process",
    "FAULT_KINDS": "faults",
    "DEFAULT_FAULT_KINDS": "faults",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
